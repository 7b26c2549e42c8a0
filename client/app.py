"""Flower ClientApp: one app for every task; the run config's ``task`` says which.

Thin wiring only: parse the configs, call ``client.site``, and turn any failure into an error reply so
one broken site never crashes the federation. ``make_client_app(defaults)`` exists because
``flwr.simulation.run_simulation`` hands apps an empty run config: the simulation runner bakes its run
config in as defaults, which ``flwr run`` / ``-c`` values still override. With ``secagg = true`` the
train messages of Flower's SecAgg+ protocol go to the legacy app of ``client/secagg.py`` (same trainer),
and a plain train request is refused so the site never sends a lone update.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from client.policy import enforced
from client.secagg import is_secagg_message, make_secagg_client_app, train_unmasked
from client.site import evaluate_site, query_site, safe_reason

log = logging.getLogger(__name__)
SITE_ERROR_CODE = 4242  # an application error raised by the site's handler


def reply(
    msg: Message, ctx: Context, handler: Callable[..., RecordDict], defaults: Mapping[str, Any],
    node_defaults: Mapping[str, Any] | None = None,
) -> Message:
    """Run ``handler`` under the site policy (audited); an exception becomes an error reply of fixed
    words."""
    try:
        out = enforced(msg.metadata.message_type, msg, ctx,
                       lambda run, node: handler(msg.content, run, node), defaults,
                       node_defaults or {})
        return Message(out, reply_to=msg)
    except Exception as err:
        log.warning("site handler failed: %s", err, exc_info=True)
        return Message(Error(code=SITE_ERROR_CODE, reason=safe_reason(err)), reply_to=msg)


def delegate(app: ClientApp, msg: Message, ctx: Context, defaults: Mapping[str, Any],
             node_defaults: Mapping[str, Any]) -> Message:
    """Run ``msg`` through another ClientApp under the site policy (audited); a raised exception
    becomes an error reply."""
    try:
        return enforced("train", msg, ctx, lambda run, node: app(msg, ctx), defaults, node_defaults,
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


def make_client_app(defaults: Mapping[str, Any] | None = None,
                    node_defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run and node configs fall back to ``defaults`` / ``node_defaults``."""
    base, node_base = dict(defaults or {}), dict(node_defaults or {})
    client_app = ClientApp()
    secagg_app = make_secagg_client_app(base, node_base)

    @client_app.train(mods=[central_dp_clipping_mod])
    def train(msg: Message, ctx: Context) -> Message:
        if is_secagg_message(msg):
            return delegate(secagg_app, msg, ctx, base, node_base)
        return reply(msg, ctx, train_unmasked, base, node_base)

    @client_app.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        return reply(msg, ctx, evaluate_site, base, node_base)

    @client_app.query()
    def query(msg: Message, ctx: Context) -> Message:
        return reply(msg, ctx, query_site, base, node_base)

    return client_app


app = make_client_app()
