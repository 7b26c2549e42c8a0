"""QTMnet as a learning-core task kind (``regression_maps``): build, train, evaluate, export, load."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.device import pick_device


class RegressionMapsAdapter:
    """The ``regression_maps`` kind: a 4D DCE series in, perfusion parameter maps out (QTMnet)."""

    def build(self, spec, cfg):
        from shared.qtm.net import build_qtmnet

        return build_qtmnet()

    def train(self, model, samples, spec, cfg, *, epochs, proximal_mu, global_state, privatize):
        from shared.qtm.train import examples_from_samples, train_qtmnet
        from shared.training.loop import TrainResult

        if privatize is not None:
            raise ValueError(f"dp = opacus is not supported for the {spec.name} task (no per-patient "
                             "classifier records to clip); use dp = none or central")
        out = train_qtmnet(model, examples_from_samples(samples), epochs, lr=cfg.lr,
                           batch_size=cfg.batch_size, device=str(pick_device(cfg.device)),
                           seed=cfg.seed, proximal_mu=proximal_mu, global_state=global_state)
        return TrainResult(num_examples=len(samples), loss=out["loss"], metrics={"loss": out["loss"]},
                           seconds=out["seconds"])

    def evaluate(self, model, samples, spec, cfg):
        from shared.qtm.train import evaluate_qtmnet, examples_from_samples
        from shared.training.loop import EvalResult

        metrics = evaluate_qtmnet(model, examples_from_samples(samples), str(pick_device(cfg.device)))
        return EvalResult(len(samples), metrics, None, None, np.zeros((0, 0)), np.zeros(0, np.int64),
                          [s.case_id for s in samples])

    def export(self, model, spec, cfg, out, provenance, metrics):
        from shared.qtm.bundle import save_qtmnet

        return save_qtmnet(model, Path(out), provenance, metrics)

    def load(self, model_dir, meta):
        from shared.qtm.bundle import load_qtmnet

        return load_qtmnet(Path(model_dir))


ADAPTER = RegressionMapsAdapter()
