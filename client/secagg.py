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
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp

from client.site import SiteError, train_site
from shared import records as R
from shared.config import NodeConfig, RunConfig, learning_core, train_config_for

log = logging.getLogger(__name__)


def is_secagg_message(msg: Message) -> bool:
    """True for the messages of Flower's SecAgg+ protocol (they carry its config record)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    return RECORD_KEY_CONFIGS in msg.content.config_records


def train_unmasked(content: RecordDict, run: RunConfig, node: NodeConfig) -> RecordDict:
    """A plain train request; refused when the run asks for SecAgg+ (never send a lone update)."""
    if run.secagg:
        raise SiteError("secagg-required", "run config sets secagg = true: this site sends its "
                        "update only masked (SecAgg+), not in a plain train reply")
    return train_site(content, run, node)


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
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(p)) for k, p in zip(keys, parameters)})
        content = RecordDict({R.ARRAYS: arrays, R.CONFIG: ConfigRecord(dict(config))})
        out = train_site(content, self.run, self.node)
        local = out[R.ARRAYS]
        update = [local[k].numpy().astype(np.float64) - np.asarray(p, dtype=np.float64)
                  for k, p in zip(keys, parameters)]
        metrics: dict[str, Any] = {k: v for k, v in out[R.METRICS].items()
                                   if isinstance(v, (int, float))}
        metrics[R.SITE_ID] = str(out[R.CONFIG][R.SITE_ID])
        return update, int(metrics[R.NUM_EXAMPLES]), metrics


def parse_configs(ctx: Context, defaults: Mapping[str, Any],
                  node_defaults: Mapping[str, Any]) -> tuple[RunConfig, NodeConfig]:
    """The run and node configs of ``ctx`` over the defaults, the node's tightened by the site policy
    (``site-policy.toml``); an invalid config or policy is a ``bad-config``."""
    from client.policy import PolicyError, effective_node, load_policy

    try:
        run = RunConfig.from_flower({**defaults, **dict(ctx.run_config)})
        node = NodeConfig.from_flower({**node_defaults, **dict(ctx.node_config)}, run)
        return run, effective_node(load_policy(node.data_path), node) if node.data_path else node
    except (ValueError, PolicyError) as err:
        raise SiteError("bad-config", str(err)) from None


def make_secagg_client_app(defaults: Mapping[str, Any] | None = None,
                           node_defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """A legacy ClientApp behind ``secaggplus_mod``; call it with (message, context)."""
    from flwr.client.mod import secaggplus_mod

    base, node_base = dict(defaults or {}), dict(node_defaults or {})

    def client_fn(context: Context) -> Client:
        run, node = parse_configs(context, base, node_base)
        return SiteClient(run, node).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
