"""SecAgg+ on the site: the same local training, uploaded only as a masked share of a sum.

Flower 1.41 ships SecAgg+ only for its legacy API: ``secaggplus_mod`` (``flwr.client.mod``) in front of a
``NumPyClient`` run by ``ClientApp(client_fn=...)``; the mod reads the legacy fit reply (parameters and
num_examples), quantises it, adds pairwise and private masks and sends only the masked vector. So this
module wraps :func:`client.site.train_site` (the very trainer of a plain run) in a NumPyClient whose
``fit`` returns the site's **update** (local weights minus the received global weights): updates are
small, which keeps SecAgg+'s fixed clipping range (+-8) and quantisation precise. ``client/app.py``
hands every train message that carries the SecAgg+ config record to :func:`make_secagg_client_app`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.site import SiteError, train_site
from shared.config import NodeConfig, RunConfig
from shared.contract import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, SITE_ID, is_number, state_dict
from shared.learning import learning_core, train_config_for

log = logging.getLogger(__name__)


def is_secagg_message(msg: Message) -> bool:
    """True for the messages of Flower's SecAgg+ protocol (they carry its config record)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


@functools.lru_cache(maxsize=8)
def model_keys(run: RunConfig) -> tuple[str, ...]:
    """The task model's state_dict keys, in order (the legacy API sends a bare list of arrays)."""
    from shared.tasks import get_task

    model = learning_core().build_model(get_task(run.task), train_config_for(run, device="cpu"))
    return tuple(model.state_dict().keys())


class SiteClient(NumPyClient):
    """Legacy client for SecAgg+: ``fit`` = ``train_site`` on the received weights, returns the update."""

    def __init__(self, run: RunConfig, node: NodeConfig) -> None:
        self.run, self.node = run, node

    def fit(self, parameters: list[np.ndarray], config: Mapping[str, Any]):
        keys = model_keys(self.run)
        if len(keys) != len(parameters):
            raise SiteError("model-mismatch", f"received {len(parameters)} arrays, the "
                            f"{self.run.task} model has {len(keys)}", task=self.run.task)
        arrays = ArrayRecord(state_dict(dict(zip(keys, parameters, strict=True))))
        content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(dict(config))})
        out = train_site(content, self.run, self.node)
        local = out[ARRAYS]
        update = [local[k].numpy().astype(np.float64) - np.asarray(p, dtype=np.float64)
                  for k, p in zip(keys, parameters)]
        metrics: dict[str, Any] = {k: v for k, v in out[METRICS].items() if is_number(v)}
        metrics[SITE_ID] = str(out[CONFIG][SITE_ID])
        return update, int(metrics[NUM_EXAMPLES]), metrics


def make_secagg_client_app(configs: Callable[[Context], tuple[RunConfig, NodeConfig]]) -> ClientApp:
    """A legacy ClientApp behind ``secaggplus_mod``; call it with (message, context). ``configs``
    gives the typed run and node configs of a context (``client.app.site_configs``)."""

    def client_fn(context: Context) -> Client:
        return SiteClient(*configs(context)).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
