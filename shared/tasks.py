"""The task registry: one place that says what each task needs, and which cohort rows it can use.

Adding a task means adding one :class:`TaskSpec` entry here plus, at most, one network.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.cohort import LABEL_VALUES, CaseRecord, Cohort


@dataclass(frozen=True)
class TaskSpec:
    """What one task reads, predicts and reports."""

    name: str
    inputs: tuple[str, ...]  # required image columns, per timepoint
    optional_inputs: tuple[str, ...]  # used when present at every eligible row (e.g. rano's t1ce)
    timepoints: int  # 1, or 2 for baseline + follow-up (rano)
    label_column: str | None  # cohort column holding the label; None for regression (qtm)
    classes: tuple[str, ...]
    default_network: str
    input_size: tuple[int, int, int]  # voxels fed to the network (crop/pad target)
    headline_metric: str
    reference: str  # the published number this task is compared with
    kind: str = "classification"  # or "regression_maps" (qtm); see shared/training/kinds.py
    subtraction: bool = False  # two-timepoint tasks: add follow-up minus baseline channels by default
    fed_lr_schedule: str = "cosine"  # RunConfig lr-schedule = "" (the default) takes this: measured on the
    #                                  parity federations (benchmarks/README.md, "Which round to export")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return len(self.inputs) * self.timepoints


TASKS: dict[str, TaskSpec] = {
    "grading": TaskSpec(
        name="grading",
        inputs=("t1", "t1ce", "t2", "flair"),
        optional_inputs=(),
        timepoints=1,
        label_column="grade",
        classes=LABEL_VALUES["grade"],
        default_network="resnet10",
        # measured: AUC 0.987 [0.961-1.000] mask-free at 32^3 (benchmarks/README.md); HGG/LGG are large
        input_size=(32, 32, 32),
        headline_metric="auc",
        reference="AUC 0.9-0.97 on BraTS-like data",
    ),
    "typing": TaskSpec(
        name="typing",
        inputs=("t1ce",),
        optional_inputs=(),
        timepoints=1,
        label_column="tumor_type",
        classes=LABEL_VALUES["tumor_type"],
        # measured (benchmarks/README.md, typing ablation): resnet10 0.271 > unet_encoder and
        # context_cnn 0.143 at CPU budgets; 48^3 keeps every lesion >= 5 voxels (32^3 loses some)
        default_network="resnet10",
        input_size=(48, 48, 48),
        headline_metric="accuracy",
        reference="93.35% accuracy, per-class AUC 0.98-1.00 (Chakrabarty 2021)",
        # measured: 12-round parity 0.935x centralised with a constant rate, 0.864x with cosine (still
        # learning at round 12; benchmarks/README.md, "Typing at 12 rounds with the new defaults")
        fed_lr_schedule="constant",
    ),
    "rano": TaskSpec(
        name="rano",
        inputs=("t1", "t2", "flair"),
        optional_inputs=("t1ce",),
        timepoints=2,
        label_column="rano",
        classes=LABEL_VALUES["rano"],
        # measured (benchmarks/README.md): resnet10 at 48^3 with subtraction, balanced accuracy
        # 0.852 [0.755-0.944] on 100 independent pairs; densenet121 (2x the CPU) was never measured
        default_network="resnet10",
        input_size=(48, 48, 48),
        headline_metric="balanced_accuracy",
        reference="50.96% balanced accuracy (DenseNet264, LUMIERE)",
        # measured (resnet10, 32^3, independent cohort): balanced accuracy 0.233 without, 0.595 with
        subtraction=True,
    ),
    "recurrence": TaskSpec(
        name="recurrence",
        inputs=("t1", "t2", "t1ce"),
        optional_inputs=(),
        timepoints=1,
        label_column="recurrence",
        classes=LABEL_VALUES["recurrence"],
        default_network="resnet10",
        # measured: AUC 0.997 [0.989-1.000] at 48^3 (trained with as many necroses as recurrences)
        input_size=(48, 48, 48),
        headline_metric="auc",
        reference="ResNet10 AUC 0.83, sensitivity 0.78, specificity 0.94 (Ying 2025)",
    ),
    "qtm": TaskSpec(
        name="qtm",
        inputs=("dce",),
        optional_inputs=(),
        timepoints=1,
        label_column=None,
        classes=(),
        default_network="qtmnet",
        input_size=(32, 32, 16),
        headline_metric="param_mae",
        reference="QTMnet AUC 0.973 vs 2CXM 0.911 for LGG vs HGG (Romano 2026)",
        kind="regression_maps",
    ),
}


def get_task(name: str) -> TaskSpec:
    """Look a task up by name, with an error that lists the valid ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


@dataclass(frozen=True)
class TaskSample:
    """One eligible example: the session (and, for two-timepoint tasks, its baseline) plus label."""

    case: CaseRecord
    baseline: CaseRecord | None
    label: str | None

    @property
    def case_id(self) -> str:
        return self.case.case_id

    @property
    def split(self) -> str:
        return self.case.split


def select_samples(
    task: TaskSpec | str, cohort: Cohort, split: str | None = None, *, require_label: bool = True
) -> tuple[list[TaskSample], list[tuple[str, str]]]:
    """Rows of ``cohort`` that ``task`` can use, and ``(case_id, reason)`` for those it cannot.

    A row is eligible when it carries the task's label and every required input (for two-timepoint
    tasks, the baseline session named in ``baseline_case_id`` must exist and have them too). With
    ``require_label=False`` (prediction) unlabelled rows with the inputs are eligible too.
    """
    spec = get_task(task) if isinstance(task, str) else task
    by_id = cohort.by_id()
    ok: list[TaskSample] = []
    skipped: list[tuple[str, str]] = []
    for case in cohort.cases:
        if split is not None and case.split != split:
            continue
        label = None
        if spec.label_column is not None:
            label = case.labels.get(spec.label_column)
            if label is None and require_label:
                skipped.append((case.case_id, f"no {spec.label_column} label"))
                continue
        missing = [c for c in spec.inputs if c not in case.images]
        if missing:
            skipped.append((case.case_id, f"missing input(s) {', '.join(missing)}"))
            continue
        baseline = None
        if spec.timepoints == 2:
            if not case.baseline_case_id:
                skipped.append((case.case_id, "no baseline_case_id"))
                continue
            baseline = by_id.get(case.baseline_case_id)
            if baseline is None:
                skipped.append((case.case_id, f"baseline {case.baseline_case_id} not in cohort"))
                continue
            bmissing = [c for c in spec.inputs if c not in baseline.images]
            if bmissing:
                skipped.append(
                    (
                        case.case_id,
                        f"baseline {baseline.case_id} missing input(s) {', '.join(bmissing)}",
                    )
                )
                continue
        ok.append(TaskSample(case=case, baseline=baseline, label=label))
    return ok, skipped


def class_counts(spec: TaskSpec, samples: list[TaskSample]) -> dict[str, int]:
    """Number of samples per class, in the task's class order (zeros included)."""
    counts = dict.fromkeys(spec.classes, 0)
    for s in samples:
        if s.label is not None:
            counts[s.label] += 1
    return counts
