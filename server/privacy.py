"""Site-level (central) differential privacy at the server: Flower's client-side fixed clipping.

``dp = "central"``: each site clips its model update to ``max-grad-norm`` (``fixedclipping_mod`` on the
ClientApp, activated by the clipping norm the wrapper sends), the server aggregates and adds Gaussian
noise of std ``noise-multiplier * max-grad-norm / sampled sites``. Epsilon is accounted per round with
the RDP accountant (one Gaussian mechanism per round; sampling rate = sampled / eligible sites).
Only averaging strategies can be wrapped: the noise calibration assumes a (weighted) mean.
"""

from __future__ import annotations

from flwr.serverapp import strategy as S

from shared.config import RunConfig

CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm")


def wrap_central_dp(strategy: S.Strategy, run: RunConfig) -> S.Strategy:
    """Wrap ``strategy`` for central DP, or raise a clear error for a strategy it cannot wrap."""
    name = run.strategy.lower()
    if name not in CENTRAL_DP_STRATEGIES:
        raise ValueError(
            f"run config: dp='central' cannot be combined with strategy={run.strategy!r} (median, "
            f"trimmed-mean and Krum-type rules are not averages, so the DP noise calibration does "
            f"not hold); use one of {', '.join(CENTRAL_DP_STRATEGIES)}")
    return S.DifferentialPrivacyClientSideFixedClipping(
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
