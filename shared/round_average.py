"""An exponential moving average of a model's weights over rounds (``global-ema``).

With ``global-ema = d > 0`` the model that is validated, tested, selected and exported after round r is
``avg_r = d * avg_(r-1) + (1 - d) * w_r`` (``avg_1 = w_1``), where ``w_r`` is the model after round r:
the federation's aggregate, or the centralised/local baseline's weights after that round's epochs (the
same rule on both sides of a parity comparison). Training goes on from ``w_r``: the average only
smooths what is scored, against the round-to-round swings of non-IID sites. Floating-point arrays are
averaged in their own dtype; integer ones (BatchNorm's step counter) take the newest value. Plain
numpy, so the server (checkpoints) and the baselines (torch state dicts) share it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

STATE_KEY = "gliofed_global_ema"  # where a checkpoint's strategy state keeps the average


class RoundAverage:
    def __init__(self, decay: float, state: Mapping[str, np.ndarray] | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"global-ema {decay}: the decay per round must be in (0, 1)")
        self.decay = float(decay)
        self.avg: dict[str, np.ndarray] | None = (
            {k: np.array(v, copy=True) for k, v in state.items()} if state else None)

    def update(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Fold the newest round's weights in; returns the average. Each update builds new arrays and
        never changes earlier ones, so the returned dict may be kept (read it, do not write to it)."""
        if self.avg is None:
            self.avg = {k: np.array(v, copy=True) for k, v in weights.items()}
            return self.avg
        new: dict[str, np.ndarray] = {}
        for key, value in weights.items():
            old = self.avg.get(key)
            value = np.asarray(value)
            if (old is None or old.shape != value.shape
                    or not np.issubdtype(value.dtype, np.floating)):
                new[key] = np.array(value, copy=True)
            else:
                d = value.dtype.type(self.decay)
                new[key] = old * d + value * (value.dtype.type(1) - d)  # stays in value's dtype
        self.avg = new
        return self.avg

    def state(self) -> dict[str, np.ndarray]:
        """A copy of the average (empty before the first update)."""
        return {k: np.array(v, copy=True) for k, v in (self.avg or {}).items()}
