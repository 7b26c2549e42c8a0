"""Privacy-utility curve with and without public pretraining: federated grading AUC vs epsilon.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/dp_utility.py --out /tmp/bench_dp_utility

(``--engine ray`` runs each arm with Flower's Ray simulation engine, as ``gliofed simulate`` does; the
default runs the same ServerApp loop and ClientApp in this process.)

Three synthetic cohorts from different seeds (so other anatomy deformations, lesions and scanner
profiles): a *public* cohort (``--public-seed``) the pretrained model is trained on with the CLI
(``gliofed train``, nothing private), the *private* cohort (``--seed``) partitioned over the sites, and
an independent *test* cohort (``--test-seed``) that no arm trains on. Arms, each a federation of the
same sites and partition (Flower simulation, opacus at each site with ``target-epsilon`` spent over the
planned rounds, delta 1e-5):

- ``scratch``: fresh weights, every layer trained (the curve measured before this recipe);
- ``pretrained-last``: ``init-model`` = the public model, DP-SGD on the last blocks only
  (``dp-train-layers``) with virtual batches (``dp-logical-batch``); without DP every layer is trained;
- ``pretrained-full``: ``init-model`` = the public model, DP-SGD on every layer.

Score: the final global model (``export = final``: choosing a round by the sites' validation scores
would spend privacy that no ledger counts) on the whole independent test cohort, images only (every
``seg`` cell dropped), AUC with a percentile-bootstrap 95% CI and n. Targets: AUC at epsilon 8 >=
0.90x and at epsilon 3 >= 0.85x the non-DP run of the same arm.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TARGETS = {"8": 0.90, "3": 0.85}


def cohort(path: Path, cases: int, sites: int, shape: int, seed: int, lesion_scale: float = 1.0) -> Path:
    from simulations.synth import generate_cohort

    if not (path / "cohort.csv").is_file():
        generate_cohort(path, cases=cases, sites=sites, shape=shape, seed=seed, tasks=("grading",),
                        progress=False, lesion_scale=lesion_scale)
    return path


def rescore(a: argparse.Namespace) -> None:
    """Score every finished arm under ``--out`` (and the public model) on a second independent test
    cohort whose lesions are ``--rescore-lesion-scale`` times the usual size (sizes no cohort had)."""
    from shared.cohort import read_cohort
    from shared.tasks import TASKS, select_samples

    scale = a.rescore_lesion_scale
    shifted = cohort(a.out / f"test-x{scale}", a.test_cases, 2, a.size, a.test_seed + 1, scale)
    samples, _ = select_samples(TASKS["grading"], read_cohort(shifted))
    rows = {}
    for model_dir in sorted([a.out / "public-model", *a.out.glob("*-eps-*/model")]):
        if (model_dir / "models" / "model.pt").is_file():
            name = model_dir.name if model_dir.name != "model" else model_dir.parent.name
            rows[name] = score(model_dir, samples, a.boot)
            print(json.dumps({"model": name, "lesion_scale": scale, **rows[name]}), flush=True)
    (a.out / f"dp_utility_lesion_x{scale}.json").write_text(json.dumps(rows, indent=1))


def pretrain(a: argparse.Namespace, public: Path) -> Path:
    """The public model, trained with the CLI exactly as the README's recipe does."""
    out = a.out / "public-model"
    if not (out / "models" / "model.pt").is_file():
        subprocess.run([sys.executable, "-m", "gliofed", "train", "--task", "grading", "--cohort",
                        str(public), "--out", str(out), "--network", a.network, "--size", str(a.size),
                        "--epochs", str(a.public_epochs), "--batch-size", "8", "--seed", str(a.seed),
                        "--device", "cpu", "--cache-dir", str(a.out / "cache")], check=True)
    return out


def score(model_dir: Path, test_samples, n_boot: int) -> dict:
    """AUC [95% CI] and n of a MODEL_DIR on the independent test samples (images only)."""
    from task_accuracy import without_seg

    from shared.tasks import TASKS
    from shared.training import evaluate_model
    from shared.training.bundle import load_bundle, train_config_from_meta
    from shared.training.metrics import bootstrap_ci

    model, meta = load_bundle(model_dir)
    cfg = train_config_from_meta(meta, device="cpu", cache_dir=str(model_dir.parent / "score-cache"))
    ev = evaluate_model(model, without_seg(test_samples), TASKS["grading"], cfg)
    lo, hi = bootstrap_ci(ev.labels, ev.probs, TASKS["grading"].classes, "auc", n_boot=n_boot)
    return {"auc": round(float(ev.metrics["auc"]), 3), "ci95": [round(lo, 3), round(hi, 3)],
            "n": len(test_samples)}


def federate(spec, engine: str) -> Path:
    """One arm's federation; returns its exported MODEL_DIR. ``ray``: ``gliofed simulate``'s path
    (Flower's Ray simulation engine); ``inprocess``: the same partition, run config, ServerApp loop
    (``server.app.serve``) and ClientApp, with the sites answering in this process
    (``simulations.inprocess.InProcessGrid``): no Ray start-up, which took minutes per arm on the shared 2-core machine."""
    from simulations.runner import prepare_sites, run_config_for, simulate

    if engine == "ray":
        simulate(spec, echo=lambda *x: None)
        return spec.out / "model"
    from client.app import make_client_app
    from server.app import serve
    from simulations.inprocess import InProcessGrid

    sites_root, _, part = prepare_sites(spec, echo=lambda *x: None)
    run = run_config_for(spec, sites_root)
    for stale in [spec.out / "rounds.jsonl", *(spec.out / "privacy").glob("site-*.json")]:
        stale.unlink(missing_ok=True)  # a fresh run: no earlier round, no privacy spent
    app = make_client_app(run, {"min-report-cases": spec.min_report_cases})
    grid = InProcessGrid.for_sites(len(part.sites), app, run.to_flower(), spec.min_report_cases)
    return Path(serve(grid, run))


def plot(results: dict, path: Path) -> None:
    """AUC with its 95% CI against epsilon, one line per arm (non-DP at the right, as infinity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    arms = sorted({k.partition("/")[0] for k in results if "/" in k})
    for arm in arms:
        pts = sorted((16.0 if eps == "none" else float(eps), r) for k, r in results.items()
                     for a_, _, eps in [k.partition("/")] if a_ == arm)
        xs = [x for x, _ in pts]
        ys = [r["auc"] for _, r in pts]
        err = [[r["auc"] - r["ci95"][0] for _, r in pts], [r["ci95"][1] - r["auc"] for _, r in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=arm)
    if "public-model-alone" in results:
        ax.axhline(results["public-model-alone"]["auc"], ls="--", c="grey", label="public model alone")
    ax.set_xscale("log")
    ax.set_xticks([1, 3, 8, 16], ["1", "3", "8", "no DP"])
    ax.set_xlabel("epsilon per site (delta 1e-5)")
    ax.set_ylabel("AUC, independent test cohort (95% CI)")
    ax.set_title("grading: privacy vs utility")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilons", default="8,3,1")
    ap.add_argument("--arms", default="scratch,pretrained-last,pretrained-full")
    ap.add_argument("--full-epsilons", default="8,3", help="epsilons of the pretrained-full arm")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--cases", type=int, default=240, help="private cohort (the sites')")
    ap.add_argument("--public-cases", type=int, default=200)
    ap.add_argument("--test-cases", type=int, default=120)
    ap.add_argument("--public-epochs", type=int, default=15)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--network", default="small_cnn_gnws")
    ap.add_argument("--train-layers", default="last:2", help="dp-train-layers of pretrained-last")
    ap.add_argument("--logical-batch", type=int, default=32, help="dp-logical-batch of pretrained-last")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--public-seed", type=int, default=1000)
    ap.add_argument("--test-seed", type=int, default=2000)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_dp_utility"))
    ap.add_argument("--engine", choices=("inprocess", "ray"), default="inprocess")
    ap.add_argument("--rescore-lesion-scale", type=float, default=0.0,
                    help="train nothing: score the finished arms on a cohort with lesions this many "
                         "times the usual size")
    a = ap.parse_args()
    a.out = a.out.resolve()
    if a.rescore_lesion_scale:
        rescore(a)
        return
    from shared.cohort import read_cohort
    from shared.tasks import TASKS, select_samples
    from simulations.runner import SimulationSpec

    t0 = time.perf_counter()
    private = cohort(a.out / "private", a.cases, max(a.sites, 2), a.size, a.seed)
    test = cohort(a.out / "test", a.test_cases, 2, a.size, a.test_seed)
    test_samples, _ = select_samples(TASKS["grading"], read_cohort(test))
    arms = a.arms.split(",")
    results: dict[str, dict] = {}
    public_model = None
    if any(arm.startswith("pretrained") for arm in arms):
        public = cohort(a.out / "public", a.public_cases, 2, a.size, a.public_seed)
        public_model = pretrain(a, public)
        results["public-model-alone"] = score(public_model, test_samples, a.boot)
        print(json.dumps({"arm": "public-model-alone", **results["public-model-alone"]}), flush=True)
    for arm in arms:
        epsilons = a.full_epsilons if arm == "pretrained-full" else a.epsilons
        order = epsilons.split(",")  # "none" may be placed in the list; else it comes first
        if "none" not in order and arm != "pretrained-full":
            order.insert(0, "none")  # pretrained-full without DP = pretrained-last without DP
        for eps in order:
            extra: dict = {"export": "final"}
            if arm.startswith("pretrained"):
                extra["init-model"] = str(public_model)
            if eps != "none":
                extra.update({"dp": "opacus", "target-epsilon": float(eps)})
                if arm == "pretrained-last":
                    extra.update({"dp-train-layers": a.train_layers,
                                  "dp-logical-batch": a.logical_batch})
            out = a.out / f"{arm}-eps-{eps}"
            spec = SimulationSpec(sites=a.sites, partition=a.partition, rounds=a.rounds,
                                  local_epochs=a.local_epochs, cases=a.cases, size=a.size,
                                  network=a.network, seed=a.seed, cohort=private, out=out,
                                  baselines=False, extra=extra)
            t = time.perf_counter()
            model_dir = federate(spec, a.engine)
            from server.runlog import read_rounds

            last = read_rounds(out)[-1]
            row = {**score(model_dir, test_samples, a.boot),
                   "site_epsilon": last["train"].get("dp-epsilon"), "seconds": round(time.perf_counter() - t)}
            results[f"{arm}/{eps}"] = row
            print(json.dumps({"arm": arm, "epsilon": eps, **row}), flush=True)
    ratios = {}
    for key, row in results.items():
        arm, _, eps = key.partition("/")
        ref = results.get(f"{arm}/none") or results.get("pretrained-last/none")
        if eps not in ("", "none") and ref:
            ratios[key] = round(row["auc"] / ref["auc"], 3)
            if eps in TARGETS:
                ratios[key + " target"] = f">= {TARGETS[eps]}: {'met' if ratios[key] >= TARGETS[eps] else 'missed'}"
    summary = {"args": {k: str(v) for k, v in vars(a).items()}, "results": results,
               "ratio_to_non_dp": ratios, "wall_s": round(time.perf_counter() - t0)}
    (a.out / "dp_utility.json").write_text(json.dumps(summary, indent=1))
    plot(results, a.out / "dp_utility.png")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
