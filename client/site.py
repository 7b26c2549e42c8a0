"""What one site does for the federation: load its cohort, train, evaluate, report eligibility.

Plain functions from (received records, RunConfig, NodeConfig) to reply records; ``client/app.py`` only
wires them to Flower. Replies carry weights, counts and aggregate metrics, never case ids, patient ids,
file paths or images.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
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
from shared.learning import learning_core, train_config_for

log = logging.getLogger(__name__)


class SiteError(RuntimeError):
    """A site cannot take part (no data, no eligible cases, bad folder): becomes an error reply."""


@dataclass
class Site:
    """A site's eligible samples for one task, split into train and test."""

    site_id: str
    spec: Any  # shared.tasks.TaskSpec
    train: list  # list[TaskSample]
    test: list
    counts: dict[str, int]  # eligible-<split>-<class> -> count


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
    train = [s for s in samples if s.split in ("train", "val")]
    test = [s for s in samples if s.split == "test"]
    counts: dict[str, int] = {}
    for split, group in (("train", train), ("test", test)):
        for s in group:
            k = f"{ELIGIBLE_PREFIX}{split}-{s.label if s.label is not None else 'all'}"
            counts[k] = counts.get(k, 0) + 1
    site = Site(node.site_id, spec, train, test, counts)
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


def train_site(content: RecordDict, run: RunConfig, node: NodeConfig) -> RecordDict:
    """Local training from the received global weights; reply weights, example count, train metrics."""
    site = load_site(run, node)
    if not site.train:
        raise SiteError(f"site {site.site_id} has no eligible training cases for {run.task}")
    core = learning_core()
    config = content[CONFIG] if CONFIG in content else ConfigRecord()
    mu = float(config.get(PROXIMAL_MU, 0.0))
    epochs = run.local_epochs
    cfg = train_config_for(run, device=_device(run, node), epochs=epochs)
    model = core.build_model(site.spec, cfg)
    state = content[ARRAYS].to_torch_state_dict()
    model.load_state_dict(state)
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
        global_state=state if mu > 0 else None,
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
            ARRAYS: ArrayRecord(state_dict(model)),
            METRICS: MetricRecord(metrics),
            CONFIG: _site_config(site),
        }
    )


def evaluate_site(content: RecordDict, run: RunConfig, node: NodeConfig) -> RecordDict:
    """Metrics of the received model on the site's own test split, plus confusion and histograms."""
    site = load_site(run, node)
    if not site.test:
        raise SiteError(f"site {site.site_id} has no eligible test cases for {run.task}")
    core = learning_core()
    cfg = train_config_for(run, device=_device(run, node))
    model = core.build_model(site.spec, cfg)
    model.load_state_dict(content[ARRAYS].to_torch_state_dict())
    ev = core.evaluate(model, site.test, site.spec, cfg)
    metrics: dict[str, Any] = {k: float(v) for k, v in ev.metrics.items() if is_number(v)}
    metrics[NUM_EXAMPLES] = int(ev.num_examples)
    if getattr(ev, "confusion", None) is not None:
        metrics[CONFUSION] = [int(x) for x in ev.confusion.reshape(-1).tolist()]
        metrics[NUM_CLASSES] = int(ev.confusion.shape[0])
    if getattr(ev, "score_hist", None) is not None:
        metrics[SCORE_HIST] = [int(x) for x in ev.score_hist.reshape(-1).tolist()]
    return RecordDict({METRICS: MetricRecord(metrics), CONFIG: _site_config(site)})


def query_site(content: RecordDict, run: RunConfig, node: NodeConfig) -> RecordDict:
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

