"""What one site does for the federation: load its cohort, train, evaluate, report eligibility.

Plain functions from (received records, RunConfig, NodeConfig) to reply records; ``client/app.py`` only
wires them to Flower. Replies carry weights, counts and aggregate metrics, never case ids, patient ids,
file paths or images.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from shared.config import NodeConfig, RunConfig
from shared.contract import (
    ARRAYS,
    CONFIG,
    CONFUSION,
    ELIGIBLE,
    ELIGIBLE_PREFIX,
    ELIGIBLE_TOTAL,
    EVAL_SPLIT,
    FEDBN_STATE,
    METRICS,
    NUM_CLASSES,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    SCORE_HIST,
    SITE_ID,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    is_number,
    state_dict,
)
from shared.fedbn import norm_keys, split_norm
from shared.learning import learning_core, train_config_for

log = logging.getLogger(__name__)


class SiteError(RuntimeError):
    """A site cannot take part (no data, no eligible cases, bad folder): becomes an error reply."""


@dataclass
class Site:
    """A site's eligible samples for one task, split into train, validation and test."""

    site_id: str
    spec: Any  # shared.tasks.TaskSpec
    train: list  # list[TaskSample]
    test: list
    counts: dict[str, int]  # eligible-<split>-<class> -> count
    val: list = field(default_factory=list)  # scores each new global model (model selection)


VAL_FRACTION = 0.15  # share of training patients carved out for validation when a site has no val split
MIN_CARVE_PATIENTS = 4  # a stratum with fewer training patients gives none to validation


def carve_validation(train: list, seed: int) -> tuple[list, list]:
    """(train, val): a deterministic, patient-level validation split carved out of ``train``.

    For sites whose cohort names no ``val`` cases. Patients are grouped by label (stratified), ordered
    by a seeded SHA-256 of the patient id and the first ``round(VAL_FRACTION * n)`` of each group go to
    validation, so the split is the same on every machine and every round.
    """
    groups: dict[str, list[str]] = {}
    for s in train:
        pid = s.case.patient_id
        stratum = groups.setdefault(str(s.label), [])
        if pid not in stratum:
            stratum.append(pid)
    val_patients: set[str] = set()
    for pids in groups.values():
        if len(pids) < MIN_CARVE_PATIENTS:
            continue
        ranked = sorted(pids, key=lambda p: hashlib.sha256(f"val:{seed}:{p}".encode()).hexdigest())
        val_patients.update(ranked[:max(1, round(VAL_FRACTION * len(pids)))])
    return ([s for s in train if s.case.patient_id not in val_patients],
            [s for s in train if s.case.patient_id in val_patients])


_SITES: dict[tuple[str, str, int], Site] = {}


def load_site(run: RunConfig, node: NodeConfig) -> Site:
    """Read the site's cohort once per process and select the task's eligible samples."""
    key = (node.data_path, run.task, run.seed)
    if key in _SITES:
        return _SITES[key]
    from shared.cohort import CohortError, read_cohort
    from shared.tasks import get_task, select_samples

    if not node.data_path:
        raise SiteError("node config sets no data-path")
    spec = get_task(run.task)
    try:
        cohort = read_cohort(node.data_path, seed=run.seed)
    except CohortError as err:
        raise SiteError(str(err)) from None
    samples, _ = select_samples(spec, cohort)
    train = [s for s in samples if s.split == "train"]
    val = [s for s in samples if s.split == "val"]
    if not val:
        train, val = carve_validation(train, run.seed)
        log.info("site %s: no val split in the cohort; %d training case(s) carved out for validation",
                 node.site_id, len(val))
    test = [s for s in samples if s.split == "test"]
    counts: dict[str, int] = {}
    for split, group in (("train", train), ("val", val), ("test", test)):
        for s in group:
            k = f"{ELIGIBLE_PREFIX}{split}-{s.label if s.label is not None else 'all'}"
            counts[k] = counts.get(k, 0) + 1
    site = Site(node.site_id, spec, train, test, counts, val=val)
    _SITES[key] = site
    return site


def obtain_privatizer(run: RunConfig, node: NodeConfig, num_samples: int) -> Any:
    """The ``privatize=`` hook for train_epochs: opacus when the run asks for local DP, else None."""
    if run.dp != "opacus":
        return None
    from client.privacy import make_privatizer  # opacus is heavy: imported only when asked for

    return make_privatizer(run=run, node=node, num_samples=num_samples)


def _device(run: RunConfig, node: NodeConfig) -> str:
    return node.device if node.device != "auto" else run.device


def _site_config(site: Site) -> ConfigRecord:
    return ConfigRecord({SITE_ID: site.site_id})


def received_model(core: Any, site: Site, cfg: Any, content: RecordDict, run: RunConfig,
                   state: RecordDict | None) -> tuple[Any, dict]:
    """The task model with the received global weights; with FedBN, the site's own normalisation
    layers (kept in ``ctx.state`` since its last training) replace the global ones.

    Returns (model, the received state dict).
    """
    model = core.build_model(site.spec, cfg)
    received = content[ARRAYS].to_torch_state_dict()
    weights = dict(received)
    if run.fedbn and state is not None and FEDBN_STATE in state:
        weights.update(state[FEDBN_STATE].to_torch_state_dict())
    model.load_state_dict(weights)
    return model, received


def reply_arrays(model: Any, run: RunConfig, state: RecordDict | None) -> ArrayRecord:
    """The weights a train reply carries; with FedBN the normalisation layers go to ``ctx.state``
    instead (they never leave the site)."""
    weights = state_dict(model)
    if not run.fedbn:
        return ArrayRecord(weights)
    shared, norm = split_norm(weights, norm_keys(model))
    if state is not None:
        state[FEDBN_STATE] = ArrayRecord(norm)
    return ArrayRecord(shared)


def train_site(content: RecordDict, run: RunConfig, node: NodeConfig,
               state: RecordDict | None = None) -> RecordDict:
    """Local training from the received global weights; reply weights, example count, train metrics.

    ``state`` is the site's Flower ``ctx.state`` (FedBN keeps the site's normalisation layers there).
    """
    site = load_site(run, node)
    if not site.train:
        raise SiteError(f"site {site.site_id} has no eligible training cases for {run.task}")
    core = learning_core()
    config = content[CONFIG] if CONFIG in content else ConfigRecord()
    mu = float(config.get(PROXIMAL_MU, 0.0))
    epochs = run.local_epochs
    cfg = train_config_for(run, device=_device(run, node), epochs=epochs)
    model, received = received_model(core, site, cfg, content, run, state)
    train = site.train
    if run.dp == "opacus":
        from client.privacy import one_sample_per_patient

        train = one_sample_per_patient(train)  # patient-level DP: one record per patient
    privatizer = obtain_privatizer(run, node, len(train))
    t0 = time.perf_counter()
    res = core.train(
        model,
        train,
        site.spec,
        cfg,
        epochs=epochs,
        proximal_mu=mu,
        global_state=received if mu > 0 else None,
        privatize=privatizer,
        progress=False,
    )
    metrics = {f"train-{k}": float(v) for k, v in res.metrics.items() if is_number(v)}
    if privatizer is not None:
        metrics.update(privatizer.metrics())
    metrics[NUM_EXAMPLES] = int(res.num_examples)
    metrics[TRAIN_LOSS] = float(res.loss)
    metrics[TRAIN_SECONDS] = float(time.perf_counter() - t0)
    return RecordDict(
        {
            ARRAYS: reply_arrays(model, run, state),
            METRICS: MetricRecord(metrics),
            CONFIG: _site_config(site),
        }
    )


def evaluate_site(content: RecordDict, run: RunConfig, node: NodeConfig,
                  state: RecordDict | None = None) -> RecordDict:
    """Metrics of the received model on the site's own test split (or, when the message's config says
    ``eval-split = "val"``, its validation split), plus confusion and histograms. With FedBN the site's
    own normalisation layers are used (``state`` = ``ctx.state``)."""
    site = load_site(run, node)
    config = content[CONFIG] if CONFIG in content else ConfigRecord()
    split = str(config.get(EVAL_SPLIT, "test"))
    if split not in ("test", "val"):
        raise SiteError(f"evaluate: {EVAL_SPLIT}={split!r} is not test or val")
    samples = site.val if split == "val" else site.test
    if not samples:
        raise SiteError(f"site {site.site_id} has no eligible {split} cases for {run.task}")
    core = learning_core()
    cfg = train_config_for(run, device=_device(run, node))
    model, _ = received_model(core, site, cfg, content, run, state)
    ev = core.evaluate(model, samples, site.spec, cfg)
    metrics: dict[str, Any] = {k: float(v) for k, v in ev.metrics.items() if is_number(v)}
    metrics[NUM_EXAMPLES] = int(ev.num_examples)
    if getattr(ev, "confusion", None) is not None:
        metrics[CONFUSION] = [int(x) for x in ev.confusion.reshape(-1).tolist()]
        metrics[NUM_CLASSES] = int(ev.confusion.shape[0])
    if getattr(ev, "score_hist", None) is not None:
        metrics[SCORE_HIST] = [int(x) for x in ev.score_hist.reshape(-1).tolist()]
    return RecordDict({METRICS: MetricRecord(metrics), CONFIG: _site_config(site)})


def query_site(content: RecordDict, run: RunConfig, node: NodeConfig,
               state: RecordDict | None = None) -> RecordDict:
    """Eligible case counts per split and class for the run's task (no ids, only counts)."""
    site = load_site(run, node)
    counts: dict[str, Any] = {k: int(v) for k, v in site.counts.items()}
    counts[ELIGIBLE_TOTAL] = len(site.train)
    return RecordDict({ELIGIBLE: MetricRecord(counts), CONFIG: _site_config(site)})


_PATHLIKE = re.compile(r"(?:[A-Za-z]:)?[\\/][^\s'\"]+")


def safe_reason(err: BaseException) -> str:
    """An error text fit to leave the site: the exception type and message with paths removed."""
    text = _PATHLIKE.sub("<path>", str(err))
    return f"{type(err).__name__}: {text}"[:300]

