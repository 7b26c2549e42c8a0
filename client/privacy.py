"""Patient-level differential privacy at a site with opacus: wrap, account, enforce the site's budget.

``make_privatizer`` returns the ``privatize=`` hook of ``shared.training.train_epochs``. It wraps the
model, optimiser and loader with an opacus ``PrivacyEngine`` (per-sample clipping at ``max-grad-norm``,
Gaussian noise, Poisson sampling) and accounts with RDP across every local step of every round, in a
ledger file per site, so later rounds (and later runs) compose with earlier ones.

What the ledger charges is what is trained, never what a configuration says:

1. Before training, the epsilon the site would reach after the *requested* steps (the epochs the train
   message asks for x the DP loader's batches per epoch) is predicted with the accountant; above the
   hospital's ``max-epsilon`` the site declines with :class:`PrivacyBudgetExceeded` and trains nothing.
2. Otherwise those steps are *reserved* in the ledger (under a file lock, with the budget check, so two
   runs training the site at once cannot both pass it). A crash leaves the reservation charged.
3. The DP loader is wrapped in a counter: every sampled batch is a step, and a step beyond the
   reservation is refused. After training the entry is *settled* at the steps counted.

What DP-SGD trains and in what batches (``shared/training/dp_layers.py``): ``dp-train-layers`` freezes
the rest of the network before opacus wraps it (no per-sample gradients, no noise there; the accounting
is unchanged: the noise multiplier, sample rate and steps are those of the trained part), and
``dp-logical-batch`` samples logical batches (rate logical / N, one ledger step each) that the loop
trains in physical chunks of ``batch-size``.

The ledger is JSON rewritten atomically: ``fcntl.flock`` on ``<ledger>.lock``, a unique temp file in
the same folder, fsync, ``os.replace``. Opacus trains the original module's parameters in place, so the
weights sent back keep plain keys.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """RDP epsilon of a composed history of (noise multiplier, sample rate, steps)."""
    steps: dict[tuple[float, float], int] = {}
    for noise, rate, n in history:  # RDP is additive in steps: equal (noise, rate) entries merge
        if n > 0:
            steps[(float(noise), float(rate))] = steps.get((float(noise), float(rate)), 0) + int(n)
    if not steps:
        return 0.0
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise, rate, n) for (noise, rate), n in steps.items()]
    return float(acc.get_epsilon(delta))


class Ledger:
    """A site's privacy ledger: entries of (noise, sample rate, steps), reserved then settled."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive ``flock`` on the ledger's lock file (held across read-modify-write)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def entries(self) -> list[dict[str, Any]]:
        """All entries (a ledger of the older ``{"history": [...]}`` form reads as settled ones)."""
        if not self.path.exists():
            return []
        data = json.loads(self.path.read_text())
        if "entries" in data:
            return list(data["entries"])
        return [{"id": f"legacy-{i}", "noise": h[0], "sample_rate": h[1], "steps": int(h[2]),
                 "state": "charged"} for i, h in enumerate(data.get("history", []))]

    @staticmethod
    def history_of(entries: Sequence[dict[str, Any]]) -> list[tuple[float, float, int]]:
        return [(float(e["noise"]), float(e["sample_rate"]), int(e["steps"])) for e in entries]

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.history_of(self.entries()), delta)

    def _write(self, entries: list[dict[str, Any]], delta: float, epsilon: float) -> None:
        body = json.dumps({"entries": entries, "delta": delta, "epsilon": epsilon}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def reserve(self, noise: float, sample_rate: float, steps: int, delta: float,
                budget: float = 0.0, site: str = "site", run_budget: float = 0.0,
                **info: Any) -> tuple[str, float]:
        """Check ``budget`` (0 = none) and append a reserved entry atomically; (entry id, epsilon after).

        Raises :class:`PrivacyBudgetExceeded` (and writes nothing) when the steps would pass the budget;
        ``run_budget`` (0 = none) bounds the entries of the same ``run`` (site policy, a PolicyRefused).
        """
        with self.locked():
            entries = self.entries()
            if run_budget > 0:
                mine = [e for e in entries if e.get("run") == info.get("run")]
                run_eps = epsilon_of([*self.history_of(mine), (noise, sample_rate, steps)], delta)
                if run_eps > run_budget:
                    from client.policy import PolicyRefused

                    raise PolicyRefused("max-epsilon-per-run", f"{steps} DP steps would bring this "
                                        f"run to epsilon {run_eps:.2f} > {run_budget:g}")
            after = epsilon_of([*self.history_of(entries), (noise, sample_rate, steps)], delta)
            if budget > 0 and after > budget:
                before = epsilon_of(self.history_of(entries), delta)
                raise PrivacyBudgetExceeded(
                    f"privacy budget: {steps} DP steps would bring site {site} to epsilon "
                    f"{after:.2f} > max-epsilon {budget:g} (spent {before:.2f}); the site declines "
                    "to train")
            entry = {"id": uuid.uuid4().hex, "noise": float(noise), "sample_rate": float(sample_rate),
                     "steps": int(steps), "state": "reserved", "time": time.time(), **info}
            self._write([*entries, entry], delta, after)
        return entry["id"], after

    def settle(self, entry_id: str, steps: int, delta: float) -> float:
        """Set the reserved entry to the ``steps`` actually taken; returns the ledger's epsilon."""
        with self.locked():
            entries = self.entries()
            for e in entries:
                if e["id"] == entry_id:
                    e["steps"], e["state"] = int(steps), "charged"
            eps = epsilon_of(self.history_of(entries), delta)
            self._write(entries, delta, eps)
            return eps


class StepCounter:
    """Wraps the DP loader: every batch it hands out is a DP step; none beyond ``limit``."""

    def __init__(self, loader: Any, limit: int) -> None:
        self.loader, self.limit, self.steps = loader, limit, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if self.steps >= self.limit:
                raise PrivacyBudgetExceeded(
                    f"privacy: training asked for more than the {self.limit} DP steps reserved in "
                    "the ledger; stopped")
            self.steps += 1
            yield batch


def one_sample_per_patient(samples: Sequence[Any]) -> list[Any]:
    """Patient-level DP: keep one sample per patient (the last session), so a patient is one record."""
    last: dict[str, Any] = {}
    for s in samples:
        last[s.case.patient_id] = s
    return list(last.values())


@dataclass
class Privatizer:
    """The ``privatize`` hook for ``epochs`` local epochs; then :meth:`settle` charges the steps taken.

    After settling, ``epsilon`` is the site's total spent epsilon and ``steps`` this round's DP steps.
    """

    run: RunConfig
    node: NodeConfig
    num_samples: int
    ledger: Path
    epochs: int = 1
    epsilon: float = math.nan
    noise_multiplier: float = math.nan
    sample_rate: float = math.nan
    steps: int = 0
    entry_id: str = ""
    counter: StepCounter | None = field(default=None, repr=False)
    trained: list[str] = field(default_factory=list)  # parameter names DP-SGD trains (dp-train-layers)
    engine: Any = field(default=None, repr=False)

    def plan(self, batches_per_epoch: int) -> tuple[float, float, int]:
        """(noise multiplier, sample rate, steps) for ``epochs`` epochs of a loader of that length."""
        run = self.run
        sample_rate = 1.0 / max(batches_per_epoch, 1)  # what opacus' Poisson loader samples with
        steps = max(int(self.epochs), 0) * max(batches_per_epoch, 1)
        noise = float(run.noise_multiplier)
        if run.target_epsilon > 0:
            from opacus.accountants.utils import get_noise_multiplier

            planned = steps * max(int(run.num_server_rounds), 1)
            noise = float(get_noise_multiplier(target_epsilon=run.target_epsilon,
                                               target_delta=run.target_delta,
                                               sample_rate=sample_rate, steps=planned,
                                               accountant="rdp"))
        return noise, sample_rate, steps

    def __call__(self, model, optimizer, loader):
        from opacus import PrivacyEngine

        from client.policy import REQUEST, PolicyRefused, SitePolicy

        run = self.run
        from shared.training.dp_layers import LogicalBatches, logical_loader, prepare_for_dp

        self.trained = prepare_for_dp(model, run.dp_train_layers)  # what DP-SGD trains; rest frozen
        physical = int(getattr(loader, "batch_size", 0) or 0)
        if run.dp_logical_batch > physical > 0:  # virtual batches: sample logical, step in physical
            loader = logical_loader(loader, run.dp_logical_batch)
        noise, sample_rate, steps = self.plan(len(loader))
        policy, run_id = REQUEST.get() or (SitePolicy(), "")
        if noise < policy.min_noise_multiplier:
            raise PolicyRefused("min-noise-multiplier", f"noise multiplier {noise:.3f} < "
                                f"{policy.min_noise_multiplier:g}")
        self.entry_id, self.epsilon = Ledger(self.ledger).reserve(
            noise, sample_rate, steps, run.target_delta, budget=self.node.max_epsilon or 0.0,
            site=self.node.site_id or "site", run_budget=policy.max_epsilon_per_run, run=run_id,
            epochs=int(self.epochs))
        self.noise_multiplier, self.sample_rate = noise, sample_rate
        engine = PrivacyEngine(accountant="rdp")
        model_p, opt_p, loader_p = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise,
            max_grad_norm=float(run.max_grad_norm), poisson_sampling=True)
        self.engine = engine
        self.counter = StepCounter(loader_p, steps)
        if run.dp_logical_batch > physical > 0:
            return model_p, opt_p, LogicalBatches(self.counter, physical, opt_p)
        return model_p, opt_p, self.counter

    def settle(self) -> float:
        """Charge the steps counted (at least the accountant's); the reservation becomes exact."""
        if not self.entry_id:
            return self.epsilon
        taken = self.counter.steps if self.counter is not None else 0
        accounted = sum(int(h[2]) for h in self.engine.accountant.history) if self.engine else 0
        self.steps = max(taken, accounted)
        self.epsilon = Ledger(self.ledger).settle(self.entry_id, self.steps, self.run.target_delta)
        self.entry_id = ""
        return self.epsilon

    def metrics(self) -> dict[str, float]:
        return {"dp-epsilon": float(self.epsilon), "dp-delta": float(self.run.target_delta),
                "dp-noise-multiplier": float(self.noise_multiplier), "dp-steps": float(self.steps)}


def make_privatizer(run: RunConfig, node: NodeConfig, num_samples: int,
                    epochs: int | None = None) -> Privatizer:
    """The opacus hook for this site and run (``dp = "opacus"``), for ``epochs`` (default: the run's)."""
    if node.partition_id >= 0:  # a simulated site: its ledger belongs to this run, not the machine
        ledger = Path(run.run_dir) / "privacy" / f"site-{node.partition_id}.json"
    else:
        ledger = ledger_path(node.site_id or "site")
    return Privatizer(run=run, node=node, num_samples=num_samples, ledger=ledger,
                      epochs=run.local_epochs if epochs is None else int(epochs))
