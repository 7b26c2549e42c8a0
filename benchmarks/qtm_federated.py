"""Federated QTMnet across sites with different DCE protocols vs a single-protocol model.

    .venv/bin/python benchmarks/qtm_federated.py --pretrained runs/qtmnet --out runs/bench_qtm_fed

From scratch instead (``--scratch --cohort runs/bench_qtm_fed/cohort --rounds 8 --lr 2e-3``): the same
comparison without pretraining.

Three simulated sites, each with its own acquisition protocol (simulations/qtm_cohort.SITE_PROTOCOLS:
site-0 5 s frames / 300 s / SNR 40 - the protocol the pretrained model saw; site-1 2.5 s / 240 s /
SNR 25; site-2 7 s / 360 s / SNR 60). The federation (FedAvg, Flower simulation) fine-tunes the
pretrained single-protocol QTMnet (run config ``init-model``); the harness also trains the
centralised and local-only baselines from the same start. Then the pretrained model and the
federated model are scored on each site's held-out cases: normalised map error (param_mae, lower is
better) and median relative errors in the tumour.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def per_site_scores(model, site_dirs: list[Path], seed: int) -> dict[str, dict[str, float]]:
    from shared.cohort import read_cohort
    from shared.qtm.train import evaluate_qtmnet, examples_from_samples
    from shared.tasks import select_samples

    out = {}
    for d in site_dirs:
        samples, _ = select_samples("qtm", read_cohort(d, seed=seed))
        test = [s for s in samples if s.split == "test"]
        m = evaluate_qtmnet(model, examples_from_samples(test))
        out[d.name] = {k: round(m[k], 4) for k in ("param_mae", "fp-mre-tumour", "vp-mre-tumour",
                                                   "ve-mre-tumour", "ps-mre-tumour") if k in m}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pretrained", type=Path, default=Path("runs/qtmnet"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench_qtm_fed"))
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scratch", action="store_true", help="start from fresh weights, not --pretrained")
    ap.add_argument("--cohort", type=Path, default=None, help="reuse a DCE cohort (default: simulate)")
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()
    import torch

    from shared.qtm.bundle import load_qtmnet
    from shared.qtm.net import build_qtmnet
    from simulations.runner import SimulationSpec, simulate

    spec = SimulationSpec(task="qtm", sites=a.sites, cases=a.cases, rounds=a.rounds,
                          local_epochs=a.local_epochs, batch_size=4, lr=a.lr, seed=a.seed, out=a.out,
                          network="", cohort=a.cohort, partition="site",
                          extra={} if a.scratch else {"init-model": str(a.pretrained.resolve())})
    report = simulate(spec, echo=print)
    summary = json.loads((a.out / "summary.json").read_text())
    sites = sorted((a.out / "sites").glob("site-*"))
    pretrained, _ = load_qtmnet(a.pretrained)
    federated = build_qtmnet()
    federated.load_state_dict(torch.load(a.out / "model" / "models" / "model.pt", weights_only=True))
    base = summary.get("baselines", {})
    result = {
        "pooled_param_mae": {
            "federated": summary["rounds"][-1]["pooled"].get("param_mae"),
            "centralised": base.get("centralised", {}).get("final", {}).get("param_mae"),
            **{f"local-only {k}": v["final"].get("param_mae") for k, v in base.get("local", {}).items()},
        },
        "per_site": {"pretrained (protocol of site-0 only)": per_site_scores(pretrained, sites, a.seed),
                     ("federated (from scratch)" if a.scratch else "federated (fine-tuned on all sites)"):
                         per_site_scores(federated, sites, a.seed)},
        "report": str(report),
    }
    print(json.dumps(result, indent=1))
    (a.out / "qtm_federated.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
