"""The run report: RUN_DIR/report.html with PNGs (learning curves, FL vs centralised vs local-only on
the same pooled test set when a simulation trained baselines, per-site metrics with bootstrap CIs, bytes
moved and time per round). ``write_run_report(run_dir)`` renders any run folder: a simulation's
(``summary.json``) or a deployed run's (``run_config.json``, ``rounds.jsonl``, ``status.json``), where
sites are named by their ``site-id``."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None else math.nan


LOWER_IS_BETTER = ("param_mae",)  # regression errors; every other headline metric is higher-better


def headline(summary: dict[str, Any]) -> str:
    from shared.tasks import get_task

    return get_task(summary["spec"]["task"]).headline_metric


def chosen_round(summary: dict[str, Any]) -> int | None:
    """The round whose global model was exported: the best by pooled validation score (``export =
    "best"``, the default) or the last one (``export = "final"``, or no round had a validation score)."""
    rounds = summary["rounds"]
    if not rounds:
        return None
    best = (rounds[-1].get("selection") or {}).get("best_round")
    final = (summary.get("run_config") or {}).get("export", "best") == "final"
    return rounds[-1]["round"] if final or best is None else int(best)


def _chosen_row(summary: dict[str, Any]) -> dict[str, Any]:
    rnd = chosen_round(summary)
    return next((r for r in summary["rounds"] if r["round"] == rnd), {})


def comparison(summary: dict[str, Any]) -> dict[str, float]:
    """Headline metric of the exported FL model (pooled), centralised and each local-only model."""
    key = headline(summary)
    rounds = summary["rounds"]
    out = {"federated": _num(_chosen_row(summary).get("pooled", {}).get(key)) if rounds else math.nan}
    base = summary.get("baselines") or {}
    if base.get("centralised"):
        out["centralised"] = _num(base["centralised"]["final"].get(key))
        local = {n: _num(r["final"].get(key)) for n, r in base["local"].items()}
        for name, v in local.items():
            out[f"local-only {name}"] = v
        finite = [v for v in local.values() if math.isfinite(v)]
        if finite:
            out["local-only (mean)"] = sum(finite) / len(finite)
    return out


def comparison_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The comparison as report rows: model, headline [95% CI], balanced accuracy [95% CI], n, and
    which round's model it is (the federation's exported round, a baseline's best validation round)."""
    key = headline(summary)
    cis = summary.get("cis") or {}
    chosen = _chosen_row(summary)
    fed_ci = _row_ci(chosen, cis)
    rows = [{"model": "federated", f"{key} [95% CI]": _with_ci(chosen.get("pooled", {}).get(key),
                                                             fed_ci.get(key)),
             "balanced acc. [95% CI]": _with_ci(chosen.get("pooled", {}).get("balanced_accuracy"),
                                                fed_ci.get("balanced_accuracy")),
             "n": _n(chosen.get("pooled", {}).get("num_examples")),
             "model of round": chosen.get("round", "")}]
    base = summary.get("baselines") or {}
    arms = ([("centralised", base["centralised"])] if base.get("centralised") else []) + [
        (f"local-only {n}", r) for n, r in sorted((base.get("local") or {}).items())]
    for name, r in arms:
        f = r.get("final") or {}
        ci = f.get("ci") or {}
        rows.append({"model": name, f"{key} [95% CI]": _with_ci(f.get(key), ci.get(key)),
                     "balanced acc. [95% CI]": _with_ci(f.get("balanced_accuracy"),
                                                        ci.get("balanced_accuracy")),
                     "n": _n(f.get("n")), "model of round": r.get("kept_round", f.get("round", ""))})
    comp = comparison(summary)
    if "local-only (mean)" in comp:
        rows.append({"model": "local-only (mean)", f"{key} [95% CI]": _with_ci(comp["local-only (mean)"], None),
                     "balanced acc. [95% CI]": "", "n": "", "model of round": ""})
    return rows


def _n(v: Any) -> Any:
    return int(v) if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def _row_ci(row: dict[str, Any], cis: dict[Any, Any]) -> dict[str, list[float]]:
    """A round's pooled CIs: from its own row (``ci``, written by the server), else from the counts."""
    own = (row.get("ci") or {}).get("pooled")
    if own:
        return own
    return (cis.get(row.get("round")) or {}).get("pooled", {})


def _plots(run_dir: Path, summary: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = headline(summary)
    rounds = summary["rounds"]
    xs = [r["round"] for r in rounds]
    base = summary.get("baselines") or {}
    figs: list[tuple[str, str]] = []

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(xs, [_num(r["pooled"].get(key)) for r in rounds], "o-", label=f"federated ({summary['spec']['strategy']}), pooled")
    if any("val" in r for r in rounds):
        ax.plot(xs, [_num((r.get("val") or {}).get("pooled", {}).get(key)) for r in rounds], "x:",
                color="C0", label="federated, pooled validation (selects the round)")
    chosen = _chosen_row(summary)
    if chosen:
        ax.plot([chosen["round"]], [_num(chosen["pooled"].get(key))], "*", ms=16, color="gold",
                mec="k", zorder=5, label=f"exported model (round {chosen['round']})")
    cis = summary.get("cis") or {}
    band = [(r["round"], _row_ci(r, cis)[key]) for r in rounds if key in _row_ci(r, cis)]
    if band:
        ax.fill_between([b[0] for b in band], [b[1][0] for b in band], [b[1][1] for b in band],
                        color="C0", alpha=0.15, label="pooled, bootstrap 95% CI")
    if any("central" in r for r in rounds):
        ax.plot(xs, [_num(r.get("central", {}).get(key)) for r in rounds], "s--", label="federated, server test set")
    if base.get("centralised"):
        c = base["centralised"]["curve"]
        ax.plot([p["round"] for p in c], [_num(p.get(key)) for p in c], "^-", label="centralised (pooled data)")
        for i, (name, r) in enumerate(sorted(base["local"].items())):
            ax.axhline(_num(r["final"].get(key)), ls=":", lw=1, color=f"C{3 + i % 6}",
                       label=f"local-only {name} (final)")
    ax.set(xlabel="round (baselines: after the same number of local epochs)" if base else "round",
           ylabel=f"{key} on pooled test set",
           title="Learning curves")
    ax.set_xticks(xs)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    figs.append(("learning_curves.png", "Learning curves on the pooled test set"))
    fig.tight_layout(); fig.savefig(run_dir / figs[-1][0], dpi=110); plt.close(fig)

    comp = comparison(summary)
    if base.get("centralised"):
        figs.append(_comparison_plot(run_dir, comp, key))
    from server.report_matrix import matrix_figures

    return _more_plots(run_dir, summary, key, figs) + matrix_figures(run_dir, summary, key)


def _comparison_plot(run_dir: Path, comp: dict[str, float], key: str) -> tuple[str, str]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    names = list(comp)
    colors = ["C0" if n == "federated" else "C2" if n == "centralised" else "C7" for n in names]
    bars = ax.barh(names, [comp[n] for n in names], color=colors)
    lower_better = key in LOWER_IS_BETTER
    for b, v in zip(bars, comp.values()):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:.4f}" if lower_better else f" {v:.3f}",
                va="center", fontsize=8)
    finite = [v for v in comp.values() if math.isfinite(v)]
    right = max(finite, default=1.0) * 1.25 if lower_better else 1.08
    ax.set(xlabel=f"final {key} on the same pooled test set" + (" (lower is better)" if lower_better else ""),
           xlim=(0, right), title="Federated vs centralised vs local-only")
    ax.invert_yaxis()
    fig.tight_layout(); fig.savefig(run_dir / "comparison.png", dpi=110); plt.close(fig)
    return "comparison.png", "Final comparison"


def _more_plots(run_dir: Path, summary: dict[str, Any], key: str, figs: list) -> list:
    import matplotlib.pyplot as plt

    rounds = summary["rounds"]
    xs = [r["round"] for r in rounds]
    sites = sorted({s for r in rounds for s in r.get("sites", {})})
    if sites:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for s in sites:
            ys = [_num(r["sites"].get(s, {}).get(key)) for r in rounds]
            note = "" if any(math.isfinite(y) for y in ys) else f" (no {key}: one class in its test split)"
            ax.plot(xs, ys, "o-", label=s + note)
        ax.set(xlabel="round", ylabel=f"{key} on the site's own test split",
               title="Global model per site")
        ax.set_xticks(xs); ax.grid(alpha=0.3); ax.legend(fontsize=7)
        figs.append(("per_site.png", "Per-site metrics of the global model"))
        fig.tight_layout(); fig.savefig(run_dir / figs[-1][0], dpi=110); plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    mib = 1024 * 1024
    w = 0.4
    a1.bar([x - w / 2 for x in xs], [r["bytes_sent"] / mib for r in rounds], w, label="sent")
    a1.bar([x + w / 2 for x in xs], [r["bytes_received"] / mib for r in rounds], w, label="received")
    a1.set(xlabel="round", ylabel="MiB", title="Bytes moved per round"); a1.set_xticks(xs)
    a1.legend(fontsize=7)
    a2.bar(xs, [r["seconds"] for r in rounds], color="C1", label="round wall time")
    slowest = [max(r.get("site_train_seconds", {}).values() or [0]) for r in rounds]
    a2.plot(xs, slowest, "k_", ms=20, mew=2, label="slowest site's training")
    a2.set(xlabel="round", ylabel="seconds", title="Time per round"); a2.set_xticks(xs)
    a2.legend(fontsize=7)
    figs.append(("rounds.png", "Bytes and time per round"))
    fig.tight_layout(); fig.savefig(run_dir / figs[-1][0], dpi=110); plt.close(fig)
    return figs


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.3f}"
    return html.escape("" if v is None else str(v))


def _val_cell(row: dict[str, Any], key: str) -> str:
    pooled = (row.get("val") or {}).get("pooled") or {}
    value = _num(pooled.get(key))
    return "n/a" if not math.isfinite(value) else f"{value:.3f} ({int(pooled.get('num_examples', 0))})"


def _selection_note(summary: dict[str, Any]) -> str:
    rounds = summary["rounds"]
    rnd = chosen_round(summary)
    if rnd is None:
        return ""
    sel = rounds[-1].get("selection") or {}
    if rnd == sel.get("best_round") and (summary.get("run_config") or {}).get("export") != "final":
        why = (f"the best pooled validation {sel.get('metric')} ({sel.get('best_value'):.3f}) of the "
               f"new global model over rounds 1-{rounds[-1]['round']}")
        peak = sel.get("peak_round")
        if peak is not None and peak != rnd:
            why = (f"the last round within {sel.get('tolerance', 0):g} (relative) of the best pooled "
                   f"validation {sel.get('metric')}, {sel.get('peak_value'):.3f} in round {peak} "
                   f"(this round {sel.get('best_value'):.3f}; rounds 1-{rounds[-1]['round']})")
    else:
        why = "the final round (export = final, or no round had a validation score)"
    ema = float((summary.get("run_config") or {}).get("global-ema") or 0)
    smooth = (f" Each global model here is the moving average of the aggregates up to its round "
              f"(global-ema, decay {ema:g} per round); the baselines average their rounds the same "
              "way." if ema > 0 else "")
    return (f"<p>Exported model: <b>round {rnd}</b>, {html.escape(why)}. The federated result below "
            f"is that round's model on the pooled test set.{html.escape(smooth)}</p>")


def _with_ci(value: Any, ci: list[float] | None) -> str:
    v = _num(value)
    if not math.isfinite(v):
        return "n/a"
    inside = ci and ci[0] - 1e-9 <= v <= ci[1] + 1e-9  # exact site AUC vs binned-score interval
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if inside else f"{v:.3f}"


def _intro(summary: dict[str, Any]) -> str:
    spec = summary["spec"]
    if summary.get("baselines") is not None and "partition" in spec:
        engine = ("sites one after the other in process" if spec.get("engine") == "inprocess"
                  else "includes Ray start-up")
        return (f"Partition <code>{html.escape(str(spec['partition']))}</code>, seed {spec['seed']}, "
                f"network {html.escape(str(spec['network']))}, {spec['size']}<sup>3</sup> inputs, "
                f"{spec['local_epochs']} local epoch(s) per round. All models are scored on the same "
                f"pooled test set ({(summary.get('baselines') or {}).get('test_cases', 'n/a')} cases): "
                f"the union of the sites' test splits. Federation wall time {summary['fl_seconds']:.1f} s "
                f"({engine}), total {summary['total_seconds']:.1f} s.")
    return (f"A deployed federation (no baselines: the server never sees the sites' data). Network "
            f"{html.escape(str(spec.get('network') or 'task default'))}, {spec.get('local_epochs')} "
            f"local epoch(s) per round, seed {spec.get('seed')}. Pooled metrics are exact: the sites' "
            f"confusion matrices and score histograms are summed. Run wall time "
            f"{summary['fl_seconds']:.1f} s. Per-site outcome of every round: "
            f"<a href=\"sites.log\">sites.log</a>.")


def write_report(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write the PNGs and ``report.html``; returns the HTML path."""
    from server.evalci import round_cis
    from server.personal import personal_section
    from server.report_matrix import matrix_tables

    run_dir = Path(run_dir)
    summary = {**summary, "cis": summary.get("cis") or round_cis(run_dir)}
    figs = _plots(run_dir, summary)
    key = headline(summary)
    cis = summary["cis"]
    comp = comparison_rows(summary)
    chosen = chosen_round(summary)
    rounds = [
        {"round": r["round"], "exported": "\u2605 exported" if r["round"] == chosen else "",
         f"val {key} (n)": _val_cell(r, key),
         f"pooled {key} [95% CI]": _with_ci(r["pooled"].get(key), _row_ci(r, cis).get(key)),
         "pooled balanced acc. [95% CI]": _with_ci(r["pooled"].get("balanced_accuracy"),
                                                   _row_ci(r, cis).get("balanced_accuracy")),
         "test cases": int(_num(r["pooled"].get("num_examples")) or 0)
         if math.isfinite(_num(r["pooled"].get("num_examples"))) else "n/a",
         "sites replied": f"{r['replied']}/{r['sampled']}", "seconds": _num(r["seconds"]),
         "MiB sent": r["bytes_sent"] / 2**20, "MiB received": r["bytes_received"] / 2**20}
        for r in summary["rounds"]
    ]
    last = summary["rounds"][-1] if summary["rounds"] else {}
    last_ci = ((last.get("ci") or {}).get("sites")
               or (cis.get(last.get("round")) or {}).get("sites", {}))
    per_site = [{"site": s,
                 f"{key} [95% CI]": _with_ci(m.get(key), last_ci.get(s, {}).get(key)),
                 "balanced acc. [95% CI]": _with_ci(m.get("balanced_accuracy"),
                                                    last_ci.get(s, {}).get("balanced_accuracy")),
                 "test cases": int(_num(m.get("num-examples", m.get("num_examples", 0)))),
                 "training s": _num((last.get("site_train_seconds") or {}).get(s))}
                for s, m in sorted((last.get("sites") or {}).items())]
    spec = summary["spec"]
    imgs = "".join(f'<figure><img src="{f}" alt="{html.escape(t)}"><figcaption>{html.escape(t)}'
                   f"</figcaption></figure>" for f, t in figs)
    has_ci = bool(cis) or any(r.get("ci") for r in summary["rounds"])
    ci_note = ("Intervals: bootstrap 95% CI over the test cases (1000 resamples of the summed "
               "confusion matrices and score histograms: a multinomial draw over the confusion cells, "
               "and for AUC a stratified draw over each class's positive and negative score "
               "histograms); n = test cases." if has_ci else
               "No per-case counts were logged for this run, so no confidence intervals; "
               "n = test cases is shown instead.")
    model = ('<p>Exported model: <a href="model/">model/</a> (a MODEL_DIR bundle).</p>'
             if (run_dir / "model").is_dir() else "")
    partition = (f"<h2>Partition</h2>{_table(summary['class_table'])}"
                 if summary.get("class_table") else "")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>gliofed run: {html.escape(spec['task'])}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}figure{{display:inline-block;margin:.5em}}</style></head><body>
<h1>Federated {html.escape(spec['task'])}: {len(summary['site_names'])} sites, {len(summary['rounds'])} rounds, {html.escape(spec['strategy'])}</h1>
<p>{_intro(summary)}</p>{model}
<h2>Result</h2>{_selection_note(summary)}{_table(comp)}{imgs}
<h2>Rounds</h2><p>{ci_note}</p>{_table(rounds)}
<h2>Per site (last round, global model on each site's test split)</h2>{_table(per_site)}
{personal_section(summary, key, _table, _with_ci)}
{matrix_tables(summary, key, _with_ci)}
{partition}
</body></html>"""
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out


def summary_from_run_dir(run_dir: str | Path) -> dict[str, Any]:
    """The report's input for any run folder (a simulation's summary.json is used when present)."""
    import json

    from server.runlog import read_rounds
    from server.status import read_status

    run_dir = Path(run_dir)
    rounds = read_rounds(run_dir)
    if not rounds:
        raise FileNotFoundError(f"{run_dir}: no rounds.jsonl with a finished round (not a gliofed "
                                "run folder, or the run has not finished a round yet)")
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        summary["rounds"] = rounds
        return summary
    cfg_path = run_dir / "run_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    status = read_status(run_dir) or {}
    sites = sorted({s for r in rounds for s in (r.get("sites") or {})}
                   | {s for r in rounds for s in (r.get("site_train_seconds") or {})})
    seconds = sum(_num(r.get("seconds")) for r in rounds)
    if status.get("finished") and status.get("started"):
        seconds = float(status["finished"]) - float(status["started"])
    return {
        "spec": {"task": cfg.get("task", status.get("task", "grading")),
                 "strategy": cfg.get("strategy", status.get("strategy", "?")),
                 "network": cfg.get("network", ""), "local_epochs": cfg.get("local-epochs"),
                 "seed": cfg.get("seed")},
        "run_config": cfg, "site_names": sites, "class_table": [], "rounds": rounds,
        "baselines": None, "fl_seconds": seconds, "total_seconds": seconds,
    }


def write_run_report(run_dir: str | Path) -> Path:
    """Render ``RUN_DIR/report.html`` for any run folder."""
    return write_report(Path(run_dir), summary_from_run_dir(run_dir))
