"""What one site does for the federation: load its cohort, train, evaluate, report eligibility.

Plain functions from (received records, RunConfig, NodeConfig) to reply records; ``client/app.py`` only
wires them to Flower. Replies carry weights, counts and aggregate metrics, never case ids, patient ids,
file paths or images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.personal import ditto_start, personal_model, train_ditto
from client.scaffold import scaffold_correction, scaffold_reply
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
    PERSONAL_METRICS,
    PROXIMAL_MU,
    SCAFFOLD_DELTA,
    SCORE_HIST,
    SERVER_ROUND,
    SITE_ID,
    SKIPPED,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    is_number,
    state_dict,
)
from shared.fedbn import norm_keys, split_norm
from shared.learning import learning_core, train_config_for

log = logging.getLogger(__name__)


ERROR_KINDS: dict[str, str] = {  # the only words an error reply may carry (plus column/count/task)
    "no-data-path": "node config sets no data-path",
    "cohort-unreadable": "the site's cohort.csv cannot be read",
    "no-training-cases": "no eligible training cases for the task",
    "no-test-cases": "no eligible test cases for the task",
    "no-usable-cases": "every eligible case has an unusable image",
    "model-mismatch": "the received weights do not fit the task's network",
    "model-not-finite": "the received weights hold NaN or infinite values (the federation diverged)",
    "privacy-budget": "training would pass the site's max-epsilon",
    "secagg-required": "the run asks for SecAgg+: no plain update is sent",
    "bad-config": "the run or node config (or the site policy file) is invalid",
    "policy-refused": "the request breaks a rule of the site's policy (site-policy.toml)",
    "internal-error": "the site failed (details in the site's log)",
}


class SiteError(RuntimeError):
    """A site cannot take part: becomes an error reply built from :data:`ERROR_KINDS` only.

    ``detail`` is the full local explanation (logged at the site, never sent); ``column`` (a cohort
    column), ``count`` and ``task`` (a task name) may travel with the kind.
    """

    def __init__(self, kind: str, detail: str = "", *, column: str | None = None,
                 count: int | None = None, task: str | None = None) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown site error kind {kind!r}")
        super().__init__(detail or ERROR_KINDS[kind])
        self.kind, self.column, self.count, self.task = kind, column, count, task


@dataclass
class Site:
    """A site's usable samples for one task, split into train, validation and test."""

    site_id: str
    spec: Any  # shared.tasks.TaskSpec
    train: list  # list[TaskSample]
    test: list
    counts: dict[str, int]  # eligible-<split>-<class> -> count
    skipped: int = 0  # eligible cases left out because an image is unusable (reasons in the log)
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


_SITES: dict[tuple, Site] = {}


def _screen(samples: list, spec: Any, run: RunConfig, node: NodeConfig) -> tuple[list, list]:
    """Usable samples and (case_id, reason) for the others; the reasons go to the site's log only."""
    cfg = train_config_for(run, device="cpu")  # opening the images needs no accelerator
    if not hasattr(cfg, "resolved"):  # a stand-in learning core: nothing to screen with
        return samples, []
    from shared.training.screen import screen_samples

    ok, skipped = screen_samples(samples, spec, cfg)
    for cid, reason in skipped:
        log.warning("site %s: skipped case %s: %s", node.site_id, cid, reason)
    return ok, skipped


def load_site(run: RunConfig, node: NodeConfig) -> Site:
    """Read the site's cohort once per process, select the task's samples, skip unusable cases."""
    key = (node.data_path, node.allow_outside, node.max_image_mb, run.task, run.seed,
           run.input_size, run.cache_dir)
    if key in _SITES:
        return _SITES[key]
    import os

    from shared.cohort import CohortError, read_cohort
    from shared.imageio import set_max_image_mb
    from shared.tasks import get_task, select_samples

    if not node.data_path:
        raise SiteError("no-data-path")
    set_max_image_mb(node.max_image_mb)
    spec = get_task(run.task)
    try:
        cohort = read_cohort(node.data_path, seed=run.seed,
                             allow_outside=[p for p in node.allow_outside.split(os.pathsep) if p])
    except CohortError as err:
        raise SiteError("cohort-unreadable", str(err)) from None
    for problem in cohort.errors:
        log.warning("site %s: %s", node.site_id, problem)
    samples, _ = select_samples(spec, cohort)
    samples, skipped = _screen(samples, spec, run, node)
    if skipped and not samples:
        cols = Counter(reason.split(":")[0] for _, reason in skipped)
        raise SiteError("no-usable-cases", f"every eligible case was skipped: {skipped[0][1]}, ...",
                        column=cols.most_common(1)[0][0], count=len(skipped))
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
    site = Site(node.site_id, spec, train, test, counts, len(skipped), val=val)
    _SITES[key] = site
    return site


def load_received(model: Any, arrays: ArrayRecord, run: RunConfig,
                  state: RecordDict | None = None) -> dict:
    """Put the server's weights into ``model``; weights of another network are a ``model-mismatch``.

    With FedBN the site's own normalisation layers (kept in ``ctx.state`` = ``state`` since its last
    training) replace the global ones. Returns the received state dict.
    """
    received = arrays.to_torch_state_dict()
    weights = dict(received)
    if run.fedbn and state is not None and FEDBN_STATE in state:
        weights.update(state[FEDBN_STATE].to_torch_state_dict())
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, ValueError) as err:
        raise SiteError("model-mismatch", f"the received weights do not fit the {run.task} "
                        f"network: {str(err).splitlines()[0][:200]}", task=run.task) from None
    bad = [k for k, v in received.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise SiteError("model-not-finite", f"{len(bad)} received arrays hold NaN or infinite values "
                        f"(first: {bad[0]}); the server's aggregate diverged", task=run.task)
    return received


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


def obtain_privatizer(run: RunConfig, node: NodeConfig, num_samples: int, epochs: int) -> Any:
    """The ``privatize=`` hook for ``epochs`` epochs: opacus when the run asks for local DP, else None."""
    if run.dp != "opacus":
        return None
    from client.privacy import make_privatizer

    return make_privatizer(run=run, node=node, num_samples=num_samples, epochs=epochs)


def _device(run: RunConfig, node: NodeConfig) -> str:
    return node.device if node.device != "auto" else run.device


def _site_config(site: Site) -> ConfigRecord:
    return ConfigRecord({SITE_ID: site.site_id})


def train_site(content: RecordDict, run: RunConfig, node: NodeConfig,
               state: RecordDict | None = None) -> RecordDict:
    """Local training from the received global weights; reply weights, example count, train metrics.
    ``state`` is the site's Flower ``ctx.state`` (FedBN keeps the site's normalisation layers there).

    With local DP the ledger is charged for exactly the DP steps taken (``local-epochs`` x the DP
    loader's batches), and a request that would pass ``max-epsilon`` is refused untrained.
    """
    site = load_site(run, node)
    if not site.train:
        raise SiteError("no-training-cases", count=site.skipped, task=run.task)
    core = learning_core()
    config = content[CONFIG] if CONFIG in content else ConfigRecord()
    mu = float(config.get(PROXIMAL_MU, 0.0))
    epochs = run.local_epochs
    cfg = train_config_for(run, device=_device(run, node), epochs=epochs)
    # a new shuffle and augmentation draw every round (the same seed would replay round 1's batches)
    # and the round's learning rate (lr-schedule)
    rnd = int(config.get(SERVER_ROUND, 0))
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.replace(cfg, seed=run.seed + rnd, lr=run.round_lr(rnd))
    model = core.build_model(site.spec, cfg)
    received = load_received(model, content[ARRAYS], run, state)
    train = site.train
    if run.dp == "opacus":
        from client.privacy import one_sample_per_patient

        train = one_sample_per_patient(train)  # patient-level DP: one record per patient
    privatizer = obtain_privatizer(run, node, len(train), epochs)
    correction = scaffold_correction(content, run, state, model, lr=run.round_lr(rnd))
    start = ditto_start(run, model)
    t0 = time.perf_counter()
    try:
        res = core.train(model, train, site.spec, cfg, epochs=epochs, proximal_mu=mu,
                         global_state=received if mu > 0 else None, privatize=privatizer,
                         progress=False, **({"after_step": correction} if correction else {}))
    finally:
        if privatizer is not None:
            privatizer.settle()  # the steps taken, also when training stopped half-way
    train_ditto(run, state, site, start, received, core, cfg)  # Ditto: the personal model too
    metrics = {f"train-{k}": float(v) for k, v in res.metrics.items() if is_number(v)}
    if privatizer is not None:
        metrics.update(privatizer.metrics())
    metrics[NUM_EXAMPLES] = int(res.num_examples)
    metrics[TRAIN_LOSS] = float(res.loss)
    metrics[TRAIN_SECONDS] = float(time.perf_counter() - t0)
    metrics[SKIPPED] = int(site.skipped)
    out = RecordDict(
        {
            ARRAYS: reply_arrays(model, run, state),
            METRICS: MetricRecord(metrics),
            CONFIG: _site_config(site),
        }
    )
    if correction is not None:
        out[SCAFFOLD_DELTA] = scaffold_reply(correction, received, model, state)
    return out


def evaluate_site(content: RecordDict, run: RunConfig, node: NodeConfig,
                  state: RecordDict | None = None) -> RecordDict:
    """Metrics of the received model on the site's own test split (or, when the message's config says
    ``eval-split = "val"``, its validation split), plus confusion and histograms. With FedBN the
    site's own normalisation layers are used (``state`` = ``ctx.state``).

    Below ``min-report-cases`` test cases the reply carries no metric at all (the federation counts
    the site as absent); a score histogram is sent only when every non-empty bin holds that many.
    """
    from client.disclosure import enough_cases

    site = load_site(run, node)
    config = content[CONFIG] if CONFIG in content else ConfigRecord()
    split = "val" if str(config.get(EVAL_SPLIT, "test")) == "val" else "test"
    samples = site.val if split == "val" else site.test
    if not samples:
        raise SiteError("no-test-cases", f"no eligible {split} cases", count=site.skipped,
                        task=run.task)
    k = node.min_report_cases
    if not enough_cases(len(samples), k):
        log.warning("site %s: %d %s case(s) < min-report-cases %d: no evaluation metrics sent",
                    site.site_id, len(samples), split, k)
        return RecordDict({METRICS: MetricRecord({SKIPPED: int(site.skipped)}),
                           CONFIG: _site_config(site)})
    core = learning_core()
    cfg = train_config_for(run, device=_device(run, node))
    model = core.build_model(site.spec, cfg)
    load_received(model, content[ARRAYS], run, state)
    ev = core.evaluate(model, samples, site.spec, cfg)
    out = RecordDict({METRICS: MetricRecord(_scored(ev, site, k)), CONFIG: _site_config(site)})
    personal = personal_model(config, run, state, site, model, core, cfg) if split == "test" \
        else None
    if personal is not None:  # personalisation: the site's own model on the same test cases
        out[PERSONAL_METRICS] = MetricRecord(
            _scored(core.evaluate(personal, samples, site.spec, cfg), site, k))
    return out


def _scored(ev: Any, site: Site, k: int) -> dict[str, Any]:
    """The metrics an evaluate reply carries for one model: scalars, counts, confusion, and the score
    histogram when every non-empty bin holds at least ``k`` cases."""
    from client.disclosure import k_anonymous_rows

    metrics: dict[str, Any] = {key: float(v) for key, v in ev.metrics.items() if is_number(v)}
    metrics[NUM_EXAMPLES] = int(ev.num_examples)
    metrics[SKIPPED] = int(site.skipped)
    if getattr(ev, "confusion", None) is not None:
        metrics[CONFUSION] = [int(x) for x in ev.confusion.reshape(-1).tolist()]
        metrics[NUM_CLASSES] = int(ev.confusion.shape[0])
    hist = getattr(ev, "score_hist", None)
    hist = k_anonymous_rows(hist, k) if hist is not None else None
    if hist is not None:
        metrics[SCORE_HIST] = [int(x) for x in hist.reshape(-1).tolist()]
    elif getattr(ev, "score_hist", None) is not None:
        log.warning("site %s: a class has 1..%d test cases: score histogram not sent",
                    site.site_id, k - 1)
    return metrics


def query_site(content: RecordDict, run: RunConfig, node: NodeConfig,
               state: RecordDict | None = None) -> RecordDict:
    """Eligible case counts per split and class for the run's task (no ids, only counts)."""
    site = load_site(run, node)
    counts: dict[str, Any] = {k: int(v) for k, v in site.counts.items()}
    counts[ELIGIBLE_TOTAL] = len(site.train)
    counts[SKIPPED] = int(site.skipped)
    return RecordDict({ELIGIBLE: MetricRecord(counts), CONFIG: _site_config(site)})


def safe_reason(err: BaseException) -> str:
    """The error text that leaves the site: ``kind [column=C] [count=N] [task=T]`` or
    ``policy-refused rule=R``, nothing else.

    Built from :data:`ERROR_KINDS`, the cohort's column names and the task names only; the exception's
    own text (paths, names, dates in folder names) stays in the site's log.
    """
    from client.privacy import PrivacyBudgetExceeded
    from shared.cohort import COLUMNS
    from shared.tasks import TASKS

    if isinstance(err, SiteError):
        parts = [err.kind]
        column = (err.column or "").removeprefix("baseline ")
        if column in COLUMNS:
            parts.append(f"column={column}")
        if isinstance(err.count, int):
            parts.append(f"count={err.count}")
        if err.task in TASKS:
            parts.append(f"task={err.task}")
        return " ".join(parts)
    if isinstance(err, PrivacyBudgetExceeded):
        return "privacy-budget"
    from client.policy import RULES, PolicyRefused

    if isinstance(err, PolicyRefused):
        return f"policy-refused rule={err.rule}" if err.rule in RULES else "policy-refused"
    return "internal-error"

