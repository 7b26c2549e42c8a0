"""SCAFFOLD at the site: the received server variate, the site's own variate in ``ctx.state``, the reply.

``strategy = "scaffold"``: the train message carries the server variate ``c`` (``SCAFFOLD_C``); the
site's ``c_i`` lives in its Flower ``ctx.state`` (``SCAFFOLD_STATE``, zeros before its first round);
training runs with the per-step correction of ``shared/training/scaffold.py``; the reply carries
``c_i+ - c_i`` (``SCAFFOLD_DELTA``) and ``ctx.state`` keeps ``c_i+``. Under FedBN the variates leave
out the normalisation layers, which never leave the site anyway.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, RecordDict

from shared.config import RunConfig
from shared.contract import SCAFFOLD_C, SCAFFOLD_STATE


def scaffold_correction(content: RecordDict, run: RunConfig, state: RecordDict | None,
                        model: Any, lr: float | None = None) -> Any:
    """The ``after_step`` hook for this round's training (at this round's local ``lr``; default
    ``run.lr``), or None when the run is not SCAFFOLD."""
    if run.strategy.lower() != "scaffold":
        return None
    from shared.fedbn import norm_keys
    from shared.training.scaffold import ScaffoldCorrection, parameter_names

    c = content[SCAFFOLD_C].to_torch_state_dict() if SCAFFOLD_C in content else {}
    c_i = state[SCAFFOLD_STATE].to_torch_state_dict() if state is not None and \
        SCAFFOLD_STATE in state else {}
    names = parameter_names(model, norm_keys(model) if run.fedbn else ())
    shapes = {n: p.detach() for n, p in model.named_parameters()}
    return ScaffoldCorrection(c, c_i, names, run.lr if lr is None else lr, reference=shapes)


def scaffold_reply(correction: Any, received: dict, model: Any, state: RecordDict | None
                   ) -> ArrayRecord:
    """The variate update the reply carries; the site's new variate goes to ``ctx.state``."""
    new, delta = correction.new_variates(received, model)
    if state is not None:
        state[SCAFFOLD_STATE] = ArrayRecord(new)
    return ArrayRecord(delta)
