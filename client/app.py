"""Flower ClientApp: one app for every task; the run config's ``task`` says which.

Thin wiring only: take the configs (parsed once per process, ``client.site.site_configs``), call
``client.site``, and turn any failure into an error reply so one broken site never crashes the
federation. ``make_client_app(defaults)`` exists because ``flwr.simulation.run_simulation`` hands apps
an empty run config: the simulation runner bakes its run config in as defaults, which ``flwr run`` /
``-c`` values still override. With ``secagg = true`` the train messages of Flower's SecAgg+ protocol go
to the legacy app of ``client/secagg.py`` (same trainer), and a plain train request is refused so the
site never sends a lone update.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from client.audit import enforced
from client.policy import PolicyError, tightened
from client.secagg import is_secagg_message, make_secagg_client_app
from client.site import SiteError, evaluate_site, query_site, safe_reason, train_site
from shared.config import NodeConfig, RunConfig

log = logging.getLogger(__name__)
SITE_ERROR_CODE = 4242  # an application error raised by the site's handler


def site_configs(ctx: Context, base: RunConfig,
                 node_base: Mapping[str, Any] | None = None) -> tuple[RunConfig, NodeConfig]:
    """The typed configs of a message's context: ``base`` with Flower's run config on top, and the node
    config over ``node_base`` tightened by the site policy; parsed once per process for each distinct
    context (every message of a run shares it); an invalid one is a ``bad-config`` error."""
    try:
        run, node = _parse(base, tuple(sorted(ctx.run_config.items())),
                           tuple(sorted({**(node_base or {}), **ctx.node_config}.items())))
        return run, tightened(node)  # the site policy's limits, re-read when its file changes
    except (ValueError, PolicyError) as err:
        raise SiteError("bad-config", str(err)) from None


@functools.lru_cache(maxsize=16)
def _parse(base: RunConfig, run_items: tuple, node_items: tuple) -> tuple[RunConfig, NodeConfig]:
    run = base.overridden(dict(run_items))
    return run, NodeConfig.from_flower(dict(node_items), run)


def train_plain(content: RecordDict, run: RunConfig, node: NodeConfig,
                state: RecordDict | None = None) -> RecordDict:
    """A plain train request; refused when the run asks for SecAgg+ (never send a lone update)."""
    if run.secagg:
        raise SiteError("secagg-required", "run config sets secagg = true: this site sends its "
                        "update only masked (SecAgg+), not in a plain train reply")
    return train_site(content, run, node, state)


Configs = Callable[[Context], tuple[RunConfig, NodeConfig]]


def reply(msg: Message, ctx: Context, handler: Callable[..., RecordDict], configs: Configs) -> Message:
    """Run ``handler(content, run, node, ctx.state)`` under the site policy (audited); an exception
    becomes an error reply of fixed words (``ctx.state`` lasts across rounds: FedBN keeps the site's
    normalisation layers there)."""
    try:
        out = enforced(msg.metadata.message_type, msg, ctx,
                       lambda run, node: handler(msg.content, run, node, ctx.state), configs,
                       safe_reason)
        return Message(out, reply_to=msg)
    except Exception as err:
        log.warning("site handler failed: %s", err, exc_info=True)
        return Message(Error(code=SITE_ERROR_CODE, reason=safe_reason(err)), reply_to=msg)


def delegate(app: ClientApp, msg: Message, ctx: Context, configs: Configs) -> Message:
    """Run ``msg`` through another ClientApp under the site policy (audited); a raised exception
    becomes an error reply."""
    try:
        return enforced("train", msg, ctx, lambda run, node: app(msg, ctx), configs, safe_reason,
                        secagg_message=True)
    except Exception as err:
        log.warning("site handler failed: %s", err, exc_info=True)
        return Message(Error(code=SITE_ERROR_CODE, reason=safe_reason(err)), reply_to=msg)


def central_dp_clipping_mod(msg: Message, ctx: Context, call_next: Callable) -> Message:
    """Flower's ``fixedclipping_mod`` when the server asks for central DP (it sends a clipping norm)."""
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    config = msg.content.config_records
    if any(KEY_CLIPPING_NORM in rec for rec in config.values()):
        return fixedclipping_mod(msg, ctx, call_next)
    return call_next(msg, ctx)


def make_client_app(defaults: RunConfig | Mapping[str, Any] | None = None,
                    node_defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config falls back to ``defaults`` (a RunConfig or flat kebab-case keys)
    and whose node config falls back to ``node_defaults`` (kebab-case keys)."""
    base = defaults if isinstance(defaults, RunConfig) else RunConfig.from_flower(defaults)
    node_base = dict(node_defaults or {})

    def configs(ctx: Context) -> tuple[RunConfig, NodeConfig]:
        return site_configs(ctx, base, node_base)

    client_app = ClientApp()
    secagg_app = make_secagg_client_app(configs)

    @client_app.train(mods=[central_dp_clipping_mod])
    def train(msg: Message, ctx: Context) -> Message:
        if is_secagg_message(msg):
            return delegate(secagg_app, msg, ctx, configs)
        return reply(msg, ctx, train_plain, configs)

    @client_app.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        return reply(msg, ctx, evaluate_site, configs)

    @client_app.query()
    def query(msg: Message, ctx: Context) -> Message:
        return reply(msg, ctx, query_site, configs)

    return client_app


app = make_client_app()
