"""Patient-level differential privacy at a site with opacus: wrap, account, enforce the site's budget.

``make_privatizer`` returns the ``privatize=`` hook of ``shared.training.train_epochs``. It wraps the
model, optimiser and loader with an opacus ``PrivacyEngine`` (per-sample clipping at ``max-grad-norm``,
Gaussian noise, Poisson sampling) and accounts with RDP across every local step of every round: the
accountant's history is kept in a ledger file per site, so later rounds (and later runs) compose with
earlier ones. Before training, the epsilon that *this* round would bring the site to is computed; if it
exceeds the hospital's ``max-epsilon`` the site declines with a :class:`PrivacyBudgetExceeded` error
(which the ClientApp turns into an error reply, and the federation carries on without the site).
Opacus trains the original module's parameters in place, so the weights sent back keep plain keys.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import NodeConfig, RunConfig


class PrivacyBudgetExceeded(RuntimeError):
    """This round would take the site past its own ``max-epsilon``."""


def ledger_path(site_id: str) -> Path:
    """``$GLIOFED_PRIVACY_DIR`` or ``~/.local/state/gliofed/privacy``, one JSON file per site."""
    root = os.environ.get("GLIOFED_PRIVACY_DIR") or str(
        Path.home() / ".local" / "state" / "gliofed" / "privacy")
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in site_id) or "site"
    return Path(root) / f"{safe}.json"


def load_history(path: Path) -> list[tuple[float, float, int]]:
    if not path.exists():
        return []
    return [tuple(h) for h in json.loads(path.read_text())["history"]]


def save_history(path: Path, history: Sequence[tuple[float, float, int]], delta: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"history": [list(h) for h in history], "delta": delta,
                               "epsilon": epsilon_of(history, delta)}, indent=1))
    tmp.replace(path)


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """RDP epsilon of a composed history of (noise multiplier, sample rate, steps)."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta))


def one_sample_per_patient(samples: Sequence[Any]) -> list[Any]:
    """Patient-level DP: keep one sample per patient (the last session), so a patient is one record."""
    last: dict[str, Any] = {}
    for s in samples:
        last[s.case.patient_id] = s
    return list(last.values())


@dataclass
class Privatizer:
    """The ``privatize`` hook; after use, ``epsilon`` is the site's total spent epsilon."""

    run: RunConfig
    node: NodeConfig
    num_samples: int
    ledger: Path
    epsilon: float = math.nan
    noise_multiplier: float = math.nan
    history: list = field(default_factory=list)

    def __call__(self, model, optimizer, loader):
        from opacus import PrivacyEngine
        from opacus.accountants.utils import get_noise_multiplier

        run = self.run
        epochs = max(int(run.local_epochs), 1)
        batch = max(getattr(loader, "batch_size", None) or run.batch_size, 1)
        sample_rate = min(1.0, batch / max(self.num_samples, 1))
        steps = epochs * max(1, math.ceil(self.num_samples / batch))
        noise = float(run.noise_multiplier)
        if run.target_epsilon > 0:
            planned = steps * max(int(run.num_server_rounds), 1)
            noise = float(get_noise_multiplier(target_epsilon=run.target_epsilon,
                                               target_delta=run.target_delta,
                                               sample_rate=sample_rate, steps=planned,
                                               accountant="rdp"))
        past = load_history(self.ledger)
        after = [*past, (noise, sample_rate, steps)]
        eps_after = epsilon_of(after, run.target_delta)
        budget = self.node.max_epsilon
        if budget is not None and budget > 0 and eps_after > budget:
            raise PrivacyBudgetExceeded(
                f"privacy budget: this round would bring site {self.node.site_id} to epsilon "
                f"{eps_after:.2f} > max-epsilon {budget:g} (spent {epsilon_of(past, run.target_delta):.2f});"
                " the site declines to train")
        engine = PrivacyEngine(accountant="rdp")
        model_p, opt_p, loader_p = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise,
            max_grad_norm=float(run.max_grad_norm), poisson_sampling=True)
        # Conservative: the round is charged before it runs (a crash mid-round still counts).
        save_history(self.ledger, after, run.target_delta)
        self.history, self.noise_multiplier, self.epsilon = after, noise, eps_after
        return model_p, opt_p, loader_p

    def metrics(self) -> dict[str, float]:
        return {"dp-epsilon": float(self.epsilon), "dp-delta": float(self.run.target_delta),
                "dp-noise-multiplier": float(self.noise_multiplier)}


def make_privatizer(run: RunConfig, node: NodeConfig, num_samples: int) -> Privatizer:
    """The opacus hook for this site and run (``dp = "opacus"``)."""
    if node.partition_id >= 0:  # a simulated site: its ledger belongs to this run, not the machine
        ledger = Path(run.run_dir) / "privacy" / f"site-{node.partition_id}.json"
    else:
        ledger = ledger_path(node.site_id or "site")
    return Privatizer(run=run, node=node, num_samples=num_samples, ledger=ledger)
