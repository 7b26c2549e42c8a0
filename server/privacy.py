"""Site-level (central) differential privacy at the server: Flower's client-side fixed clipping.

``dp = "central"``: each site clips its model update to ``max-grad-norm`` (``fixedclipping_mod`` on the
ClientApp, activated by the clipping norm the wrapper sends), the server aggregates and adds Gaussian
noise of std ``noise-multiplier * max-grad-norm / sampled sites``. Epsilon is accounted per round with
the RDP accountant (one Gaussian mechanism per round; sampling rate = sampled / eligible sites).
Only averaging strategies can be wrapped (the noise calibration assumes a (weighted) mean): the run
config refuses the others when it is parsed (``shared.config.CENTRAL_DP_STRATEGIES``).

One rule counts the rounds: a round spends privacy when noise was added, i.e. when the strategy
aggregated at least one reply (:func:`noisy_rounds`); the run log and the exported model card both
use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from shared.config import RunConfig


def wrap_central_dp(strategy: Strategy, run: RunConfig) -> Strategy:
    """Wrap an averaging ``strategy`` for central DP (client-side clipping, server-side noise)."""
    return DifferentialPrivacyClientSideFixedClipping(
        strategy, noise_multiplier=run.noise_multiplier, clipping_norm=run.max_grad_norm,
        num_sampled_clients=max(run.min_train_nodes, 1))


def central_epsilon(run: RunConfig, rounds: int, sample_rate: float = 1.0) -> float:
    """Site-level epsilon after ``rounds`` noisy aggregations (RDP accountant, delta = target-delta)."""
    if rounds <= 0 or run.noise_multiplier <= 0:
        return 0.0 if rounds <= 0 else float("inf")
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(run.noise_multiplier), float(sample_rate), int(rounds))]
    return float(acc.get_epsilon(run.target_delta))


def noisy_rounds(rows: Iterable[Mapping[str, Any]]) -> int:
    """Rounds that added noise to the global model: those where at least one update was aggregated."""
    return sum(1 for row in rows if row.get("replied"))
