"""Personalisation at the site: local fine-tuning and Ditto, each scored on the site's own test split.

``personalise = "finetune"``: when the server's evaluate message says so (``PERSONALISE``, sent with the
last round's evaluation), the site fine-tunes a copy of the received global model for
``finetune-epochs`` on its training split and scores that copy; the global model is scored as usual
and is never changed.

``personalise = "ditto"`` (Li et al., ICML 2021): beside the global model's local training, each round
the site trains its own personal model ``v`` from where it left it (``ctx.state``, ``DITTO_STATE``;
the first round starts from the received global model) with the proximal term
``lambda/2 * ||v - w_global||^2`` towards the received global weights (``ditto-lambda``); every
evaluation scores ``v`` too.

The personal models never leave the site; their test metrics travel in the evaluate reply under
``PERSONAL_METRICS``, built exactly like the global ones (same ``min-report-cases`` rule, same
k-anonymous histograms). They are trained without DP even in a ``dp = "opacus"`` run: only their
test-split metrics leave the site, as for the global model.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from shared.config import RunConfig
from shared.contract import DITTO_STATE, PERSONALISE, state_dict

log = logging.getLogger(__name__)


def ditto_start(run: RunConfig, model: Any) -> Any:
    """A copy of the freshly loaded global model (Ditto's starting point before any personal model
    exists), taken before the global training changes ``model`` in place; None without Ditto."""
    return copy.deepcopy(model) if run.personalise == "ditto" else None


def train_ditto(run: RunConfig, state: RecordDict | None, site: Any, start: Any,
                received: dict, core: Any, cfg: Any) -> None:
    """One round of the site's Ditto personal model (kept in ``state``); nothing without Ditto."""
    if start is None or state is None:
        return
    personal = start
    if DITTO_STATE in state:
        personal.load_state_dict(state[DITTO_STATE].to_torch_state_dict())
    core.train(personal, site.train, site.spec, cfg, epochs=run.local_epochs,
               proximal_mu=run.ditto_lambda, global_state=received, progress=False)
    state[DITTO_STATE] = ArrayRecord(state_dict(personal))


def personal_model(config: ConfigRecord, run: RunConfig, state: RecordDict | None, site: Any,
                   global_model: Any, core: Any, cfg: Any) -> Any:
    """The site's personalised model to score now, or None (no personalisation, not the last
    round of a fine-tuning run, or no Ditto model yet). ``global_model`` is left unchanged."""
    if run.personalise == "ditto":
        if state is None or DITTO_STATE not in state:
            return None
        personal = copy.deepcopy(global_model)
        personal.load_state_dict(state[DITTO_STATE].to_torch_state_dict())
        return personal
    if run.personalise == "finetune" and int(config.get(PERSONALISE, 0)):
        if not site.train:
            log.warning("site %s: no training cases to fine-tune on", site.site_id)
            return None
        personal = copy.deepcopy(global_model)
        core.train(personal, site.train, site.spec, cfg, epochs=run.finetune_epochs,
                   progress=False)
        return personal
    return None
