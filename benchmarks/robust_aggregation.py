"""Robust aggregation under attack: one of five sites sends scaled sign-flipped updates.

    .venv/bin/python benchmarks/robust_aggregation.py --strategies fedavg,fedmedian,fedtrimmedavg,krum,bulyan

The attacker (partition 0) trains honestly, then replies ``g - scale * (w - g)`` (g: the global weights
it received). Every strategy runs on the same cohort, partition, seed and initial weights; FedAvg is
also run with the server's update validation (``validate-updates``) and without any attacker. Scores:
pooled test AUC of the final global model (from rounds.jsonl). Flower's Bulyan needs
n >= 4f + 3 sites (7 for one attacker), so with 5 sites it is reported as not applicable.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def attacked_client_app(run, scale: float):
    import numpy as np
    from flwr.app import Array, ArrayRecord, Context, Message
    from flwr.clientapp import ClientApp

    from client.app import reply, site_configs
    from client.site import evaluate_site, query_site, train_site

    def configs(ctx: Context):
        return site_configs(ctx, run)

    app = ClientApp()

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        out = reply(msg, ctx, train_site, configs)
        if int(ctx.node_config.get("partition-id", -1)) == 0 and not out.has_error():
            g = msg.content["arrays"]
            w = out.content["arrays"]
            out.content["arrays"] = ArrayRecord({
                k: Array(np.ascontiguousarray(g[k].numpy() - scale * (w[k].numpy() - g[k].numpy())))
                for k in w})
        return out

    @app.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        return reply(msg, ctx, evaluate_site, configs)

    @app.query()
    def query(msg: Message, ctx: Context) -> Message:
        return reply(msg, ctx, query_site, configs)

    return app


def run_one(spec, sites_root, scale: float, attack: bool) -> float:
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app
    from server.runlog import read_rounds
    from simulations.runner import run_config_for

    raw = run_config_for(spec, sites_root)
    run_simulation(server_app=make_server_app(raw),
                   client_app=attacked_client_app(raw, scale) if attack else make_client_app(raw),
                   num_supernodes=spec.sites,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR", "log_to_driver": False}})
    rows = read_rounds(spec.out)
    return float(rows[-1]["pooled"].get("auc", float("nan")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--strategies", default="fedavg,fedmedian,fedtrimmedavg,krum,bulyan")
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--cases", type=int, default=120)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--scale", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_robust"))
    a = ap.parse_args()
    from dataclasses import replace

    from simulations.runner import SimulationSpec, prepare_sites

    base = SimulationSpec(sites=a.sites, partition="iid", rounds=a.rounds, local_epochs=a.local_epochs,
                          cases=a.cases, size=a.size, out=a.out / "base", baselines=False,
                          extra={"num-malicious": 1, "trimmed-beta": 0.2}, network="small_cnn")
    sites_root, _, _ = prepare_sites(base, echo=lambda *x: None)
    runs = [("fedavg (no attacker)", "fedavg", False, {})]
    runs += [(s, s, True, {}) for s in a.strategies.split(",")]
    runs.append(("fedavg + update validation", "fedavg", True, {"validate-updates": True}))
    results = {}
    for label, strat, attack, extra in runs:
        if strat == "bulyan" and a.sites < 4 * 1 + 3:
            results[label] = "n/a (Bulyan needs >= 7 sites for one attacker)"
            print(json.dumps({"run": label, "auc": results[label]}), flush=True)
            continue
        spec = replace(base, strategy=strat, out=a.out / label.replace(" ", "_").replace("+", "p"),
                       cohort=base.out / "cohort", extra={**base.extra, **extra})
        results[label] = round(run_one(spec, sites_root, a.scale, attack), 3)
        print(json.dumps({"run": label, "auc": results[label]}), flush=True)
    print(json.dumps({"sites": a.sites, "attacker": "partition 0, scaled sign flip x"
                      f"{a.scale:g}", "rounds": a.rounds, "results": results}))


if __name__ == "__main__":
    main()
