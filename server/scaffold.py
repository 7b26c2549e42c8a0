"""SCAFFOLD on the server (Karimireddy et al., ICML 2020): FedAvg plus the server's control variate.

``strategy = "scaffold"`` builds :class:`Scaffold`, a Message-API FedAvg whose train messages carry the
server variate ``c`` beside the weights (``SCAFFOLD_C``) and whose train replies carry each site's
variate update ``c_i+ - c_i`` (``SCAFFOLD_DELTA``; the site's ``c_i`` stays in its ``ctx.state``, see
``client/scaffold.py``). Aggregation:

- weights: ``x <- x + eta_g * (weighted mean of the sites' y_i - x)`` (FedAvg's example-weighted mean;
  ``server-lr`` is ``eta_g``, default 1);
- variate: ``c <- c + (1 / N) * sum of the sampled sites' deltas``, ``N`` = the sites eligible to train
  this round (the paper's ``|S|/N`` times their mean).

``c`` is the strategy attribute ``control_variate``, so the round checkpoint stores it with the other
server-optimiser state (``server/strategy.py`` ``STATE_ATTRS``) and ``resume`` restores it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from shared.contract import SCAFFOLD_C, SCAFFOLD_DELTA, numpy_weights, site_of, state_dict

log = logging.getLogger(__name__)


class Scaffold(FedAvg):
    """FedAvg with SCAFFOLD's server control variate (``control_variate``: name -> array)."""

    def __init__(self, *, server_lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server_lr = float(server_lr)
        self.control_variate: dict[str, np.ndarray] = {}
        self._eligible = 0
        self._sent: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's train messages, each also carrying ``c`` (empty in round 1: zeros)."""
        self._eligible = len(list(grid.get_node_ids()))
        self._sent = arrays
        out = list(super().configure_train(server_round, arrays, config, grid))
        c = ArrayRecord(state_dict(self.control_variate))
        for msg in out:
            msg.content[SCAFFOLD_C] = c
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the weights (FedAvg, then the server step ``eta_g``) and move ``c``."""
        replies = list(replies)
        deltas, plain = [], []
        for msg in replies:
            content = dict(msg.content.items())
            record = content.pop(SCAFFOLD_DELTA, None)
            delta = None if record is None else numpy_weights(record)
            problem = "none sent" if delta is None else self._bad_delta(delta)
            if problem:
                log.warning("scaffold: site %s: control-variate update ignored (%s); its weights are "
                            "averaged, its variate counts as unchanged", site_of(msg), problem)
            else:
                deltas.append(delta)
            plain.append(Message(content=RecordDict(content), metadata=msg.metadata))
        arrays, metrics = super().aggregate_train(server_round, plain)
        if arrays is None:
            return None, metrics
        self._move_variate(deltas, max(self._eligible, len(replies)))
        if self.server_lr != 1.0 and self._sent is not None:
            arrays = self._server_step(arrays, self._sent)
        return arrays, metrics

    def _bad_delta(self, delta: dict[str, np.ndarray]) -> str:
        """Why a site's variate update cannot be used ("" when it can): a key the model lacks, a
        wrong shape, NaN/Inf."""
        sent = self._sent if self._sent is not None else {}
        for k, v in delta.items():
            if k not in sent:
                return f"unknown key {k!r}"
            if tuple(v.shape) != tuple(sent[k].shape):
                return f"shape {tuple(v.shape)} for {k}"
            if not np.isfinite(v).all():
                return f"NaN/Inf in {k}"
        return ""

    def _move_variate(self, deltas: list[dict[str, np.ndarray]], eligible: int) -> None:
        c = {k: np.array(v, dtype=np.float32, copy=True) for k, v in self.control_variate.items()}
        for delta in deltas:
            for k, v in delta.items():
                v = np.asarray(v, dtype=np.float32)
                c[k] = c[k] + v / eligible if k in c else v / eligible
        self.control_variate = c

    def _server_step(self, averaged: ArrayRecord, sent: ArrayRecord) -> ArrayRecord:
        new, old = numpy_weights(averaged), numpy_weights(sent)
        out = {}
        for k, v in new.items():
            if k in old and np.issubdtype(v.dtype, np.floating):
                out[k] = (old[k] + self.server_lr * (v - old[k])).astype(v.dtype)
            else:
                out[k] = v
        return ArrayRecord(state_dict(out))
