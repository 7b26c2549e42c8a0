"""The learning core as the federation sees it: the functions of ``shared.training`` that sites, the
server and the baselines call, and the TrainConfig a run config stands for.

Kept apart from ``shared.config`` so that parsing a configuration never reaches the training code
(``shared.training`` is imported lazily here: torch stays out of ``gliofed --help``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.config import RunConfig


@dataclass(frozen=True)
class LearningCore:
    """The functions of ``shared.training`` the federation calls (client, server and baselines).

    Imported lazily by :func:`learning_core`, so torch stays out of ``gliofed --help``.
    """

    make_config: Any  # TrainConfig(**kwargs)
    build_model: Any  # build_task_model(spec, cfg) -> torch.nn.Module
    train: Any  # train_epochs(model, samples, spec, cfg, epochs=, proximal_mu=, global_state=, ...)
    evaluate: Any  # evaluate_model(model, samples, spec, cfg) -> EvalResult


def learning_core() -> LearningCore:
    """The learning core of ``shared.training``."""
    from shared.training import TrainConfig, build_task_model, evaluate_model, train_epochs

    return LearningCore(TrainConfig, build_task_model, train_epochs, evaluate_model)


def train_config_for(run: RunConfig, device: str | None = None, epochs: int | None = None) -> Any:
    """The learning core's TrainConfig for this run (same on every site and on the server)."""
    core = learning_core()
    size = (run.input_size,) * 3 if run.input_size > 0 else None
    balance = {"balance": run.balance} if run.balance else {}
    return core.make_config(
        **balance,
        task=run.task,
        network=run.network or None,
        input_size=size,
        batch_size=run.batch_size,
        lr=run.lr,
        epochs=epochs if epochs is not None else run.local_epochs,
        seed=run.seed,
        device=device or run.device,
        cache_dir=run.cache_dir or None,
        dp_compatible=run.dp == "opacus",
    )
