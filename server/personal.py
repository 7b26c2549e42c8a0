"""Personalisation on the server: ask for the fine-tuned scores, pool the personalised metrics, report.

With ``personalise = "finetune"`` the last round's evaluation carries ``PERSONALISE = 1`` (the last
round: ``num-server-rounds``, or the round after which early stopping ends the run), and each site
fine-tunes the global model before scoring it; with ``"ditto"`` every evaluation reply carries the
site's personal-model metrics (``client/personal.py``). :func:`personal_row` turns those replies into
the run-log row's ``personalised`` entry (so ``rounds.jsonl`` and ``summary.json`` hold it): per site,
example-weighted, exactly pooled (summed confusion matrices and score histograms, like the global
model's metrics) with bootstrap 95% CIs and n, and each site's gain over the global model on the same
test cases. :func:`personal_section` is the report's table of the last such entry.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ConfigRecord, Message

from server.pooled import round_metrics
from shared.config import RunConfig
from shared.contract import (
    PERSONAL_METRICS,
    PERSONALISE,
    site_of,
)


def evaluate_config(run: RunConfig, rnd: int, last: bool) -> ConfigRecord:
    """The evaluate message config of round ``rnd``: asks for fine-tuning in the run's last round."""
    if run.personalise == "finetune" and last:
        return ConfigRecord({PERSONALISE: 1})
    return ConfigRecord()


def personal_row(run: RunConfig, replies: Iterable[Message], global_sites: dict[str, Any],
                 headline: str) -> dict[str, Any]:
    """``{"personalised": {...}}`` for the run-log row, or {} when no site sent personal metrics."""
    site_metrics = {site_of(m): dict(m.content[PERSONAL_METRICS]) for m in replies
                    if not m.has_error() and PERSONAL_METRICS in m.content}
    if run.personalise == "none" or not site_metrics:
        return {}
    out = round_metrics(site_metrics)
    out["mode"] = run.personalise
    out["pooled_ci"] = out["ci"]["pooled"]  # round_metrics bootstraps the summed counts already
    out["gain"] = {s: float(m[headline]) - float(global_sites[s][headline])
                   for s, m in out["sites"].items()
                   if headline in m and headline in global_sites.get(s, {})}
    return {"personalised": out}


def personal_section(summary: dict[str, Any], headline: str, table: Callable[[list], str],
                     with_ci: Callable[[Any, list[float] | None], str]) -> str:
    """The report's "Personalised models" section (empty when the run personalised nothing), drawn
    with the report's own ``table`` and ``with_ci`` cell formatter."""
    rows = [r for r in summary.get("rounds", []) if r.get("personalised")]
    if not rows:
        return ""
    last = rows[-1]
    p = last["personalised"]
    pooled = p.get("pooled", {})
    head = (f"<p>{html.escape(p.get('mode', ''))}: each site's personalised model on its own test "
            f"split (round {last['round']}); pooled {headline} "
            f"{with_ci(pooled.get(headline), p.get('pooled_ci', {}).get(headline))}, "
            f"n = {int(pooled.get('num_examples', 0))} test cases, vs the global model's "
            f"{with_ci(last.get('pooled', {}).get(headline), None)} on the same cases.</p>")
    global_sites = last.get("sites") or {}
    site_rows = [{"site": s, f"personalised {headline}": m.get(headline, float("nan")),
                  f"global {headline}": global_sites.get(s, {}).get(headline, float("nan")),
                  "gain": p.get("gain", {}).get(s, float("nan")),
                  "test cases": int(m.get("num-examples", 0))}
                 for s, m in sorted(p.get("sites", {}).items())]
    return f"<h2>Personalised models</h2>{head}{table(site_rows)}"
