"""Skip the cases whose images cannot be used, with a one-line reason each, instead of failing a run.

One missing, truncated, oversized, 2-D or misplaced file must not stop ``gliofed train / predict /
evaluate`` or take a federated site out of every round. :func:`screen_samples` opens each sample's
inputs the way training will (through the preprocessing cache, so the work is not repeated later) and
returns the usable samples plus ``(case_id, reason)`` for the rest. Reasons name the column and what is
wrong ("t1ce: missing file"), never file contents.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from shared.imageio import ImageError, open_image, require_3d
from shared.tasks import TaskSample, TaskSpec


def _columns_by_path(sample: TaskSample) -> dict[Path, str]:
    out: dict[Path, str] = {}
    for sess, prefix in ((sample.baseline, "baseline "), (sample.case, "")):
        if sess is not None:
            for col, path in sess.images.items():
                out.setdefault(Path(path), f"{prefix}{col}")
    return out


def _input_paths(sample: TaskSample, spec: TaskSpec, use_optional: bool) -> list[Path]:
    cols = [*spec.inputs, *(spec.optional_inputs if use_optional else ()), "seg"]
    sessions = [sample.baseline, sample.case] if spec.timepoints == 2 else [sample.case]
    return [Path(s.images[c]) for s in sessions if s is not None for c in cols if c in s.images]


def failure_reason(exc: BaseException, sample: TaskSample) -> str:
    """One line: which column failed and why (an :class:`ImageError`'s reason, else the error type)."""
    cols = _columns_by_path(sample)
    if isinstance(exc, ImageError):
        col = cols.get(Path(exc.path), "image") if exc.path else "image"
        return f"{col}: {exc.reason}"
    return f"unusable inputs ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"


def screen_samples(samples: Sequence[TaskSample], spec: TaskSpec, cfg, in_channels: int | None = None,
                   ) -> tuple[list[TaskSample], list[tuple[str, str]]]:
    """(usable samples, [(case_id, reason)]) after opening every input of every sample.

    ``cfg`` is the TrainConfig the samples will be used with (same preprocessing cache);
    ``in_channels`` the model's first-layer channels (decides whether optional inputs are read).
    """
    from shared.training.loop import _dataset, model_inputs

    if not samples:
        return [], []
    cfg = cfg.resolved()
    ok: list[TaskSample] = []
    skipped: list[tuple[str, str]] = []
    volumes = spec.kind == "classification"  # the other kinds read their own inputs (e.g. 4D DCE)
    if in_channels is None and volumes:
        in_channels = model_inputs(spec, cfg, samples)["in_channels"]
    ds = None
    if volumes:
        ds = _dataset(list(samples), spec, cfg, train=False, in_channels=in_channels)
        ds.cache.memory = False  # screening only warms the disk cache
    use_optional = bool(ds is not None and ds.use_optional)
    for i, s in enumerate(samples):
        try:
            for path in _input_paths(s, spec, use_optional):
                img = open_image(path)
                if ds is not None:  # every network input but a DCE series is one 3D volume
                    require_3d(img, path)
            if ds is not None:
                ds.load(i)
        except Exception as exc:  # noqa: BLE001 - any failure of one case skips that case only
            skipped.append((s.case_id, failure_reason(exc, s)))
            continue
        ok.append(s)
    return ok, skipped
