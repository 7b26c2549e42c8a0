"""Do explanations point at the lesion? Share of Grad-CAM and saliency mass inside the dilated lesion mask.

For each MODEL_DIR (any task network), the predicted class of every tumour-bearing case of a synthetic
cohort (the expert mask is read only for this measurement) is explained with Grad-CAM and saliency
(`shared.training.explain.explain_cases`); the share of each map's mass inside the lesion mask dilated by
2 voxels is averaged with a bootstrap 95% CI. `chance` is the share a uniform map would get (the dilated
lesion's share of the brain's non-zero voxels), the baseline to beat. Target: saliency >= 0.5.
Whether the model looks at the lesion at all is measured without any explanation method too: the drop of
the predicted class's probability when the lesion is blanked, against blanking a same-sized cube elsewhere,
and per class how many right calls survive the lesion being replaced (by the brain's mean, the median of
the tissue around it, or the mirrored other hemisphere): ``right`` and ``kept_<fill>`` in ``per_class``.

python benchmarks/explain_lesion.py --model /work/acc/models/typing --cohort /work/acc/typing-other-... --cases 40
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

TARGET_SALIENCY = 0.5


def mean_ci(values: list[float], n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    v = np.asarray([x for x in values if not np.isnan(x)])
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = [rng.choice(v, len(v)).mean() for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return float(v.mean()), float(lo), float(hi)


def chance_share(ds, i: int) -> float:
    """Share of the brain's voxels inside the dilated lesion (what a uniform map scores)."""
    from shared.training.explain import mass_inside

    x, seg = ds.load(i)
    brain = (x.float().abs().sum(0) > 0).numpy().astype(np.float64)
    return mass_inside(brain, seg.numpy()) if seg is not None else float("nan")


FILLS = ("mean", "shell", "mirror")


def _replaced(x, mask, shell, fill: str):
    """``x`` with the voxels of ``mask`` replaced by ``fill`` (one of :data:`FILLS`)."""
    import torch

    xo = x.clone()
    if fill == "mean":
        xo[..., mask] = 0.0
    elif fill == "mirror":
        xo[..., mask] = torch.flip(x, dims=(2,))[..., mask]
    else:  # shell: each channel's median over the tissue around the lesion
        v = x[0][:, shell].median(dim=1).values if shell.any() else torch.zeros(x.shape[1])
        xo[0][:, mask] = v[:, None]
    return xo


def occlusion(model, ds, i: int, rng: np.random.Generator, label: int | None = None) -> dict:
    """Does the model look at the lesion? Drop of the predicted class's probability when the dilated
    lesion is set to 0 (the z-scored brain's mean), and when a same-sized cube elsewhere in the brain
    is (the control). A model that reads the lesion loses far more in the first case. With ``label``
    (the true class), also whether a right call survives the lesion being replaced by each of
    :data:`FILLS`: the brain's mean, the median of a 3-voxel shell of tissue around it, or the mirrored
    other hemisphere (``kept_<fill>``: 1 kept, 0 lost, NaN when the call was wrong to begin with)."""
    import torch
    from scipy.ndimage import binary_dilation

    x, seg = ds.load(i)
    x = x.float()[None]
    m = binary_dilation(seg.numpy() > 0, iterations=2)
    brain = (x[0].abs().sum(0) > 0).numpy()
    nan = float("nan")
    if not m.any():
        return {"lesion": nan, "elsewhere": nan, **{f"kept_{f}": nan for f in FILLS}}
    side = max(1, round(float(m.sum()) ** (1 / 3)))
    ctrl = np.zeros_like(m)
    near = binary_dilation(m, iterations=2)
    for _ in range(50):  # a cube of the lesion's volume, inside the brain, away from the lesion
        c = [int(rng.integers(0, n - side + 1)) for n in m.shape]
        box = tuple(slice(v, v + side) for v in c)
        if brain[box].mean() > 0.9 and not near[box].any():
            ctrl[box] = True
            break
    shell = torch.from_numpy(binary_dilation(m, iterations=3) & ~m & brain)
    mt = torch.from_numpy(m)

    def probs(xi):
        return torch.softmax(model(xi), 1)[0]

    with torch.no_grad():
        p = probs(x)
        k = int(p.argmax())
        right = label is not None and k == label
        q = {f: probs(_replaced(x, mt, shell, f)) for f in FILLS if right or f == "mean"}
        out: dict = {"lesion": float(p[k] - q["mean"][k]), "elsewhere": nan}
        if ctrl.any():
            out["elsewhere"] = float(p[k] - probs(_replaced(x, torch.from_numpy(ctrl), shell, "mean"))[k])
        for fill in FILLS:
            out[f"kept_{fill}"] = float(int(q[fill].argmax()) == k) if right else nan
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", required=True, help="MODEL_DIR (repeatable)")
    ap.add_argument("--cohort", type=Path, action="append", required=True,
                    help="site folder per --model (one for all, or one each)")
    ap.add_argument("--cases", type=int, default=40, help="tumour cases per model at most")
    ap.add_argument("--methods", default="input_x_gradient,gradient,smoothgrad",
                    help="saliency methods to measure (shared.training.explain.SALIENCY_METHODS)")
    ap.add_argument("--occlusion-window", type=int, default=0,
                    help="occlusion cube side in voxels (0: the default of shared.training.explain)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    if len(a.cohort) not in (1, len(a.model)):
        ap.error("give one --cohort, or one per --model")

    from shared.cohort import read_cohort
    from shared.tasks import select_samples
    from shared.training.bundle import load_bundle, train_config_from_meta
    from shared.training.explain import explain_cases
    from shared.training.loop import _dataset, _first_conv_in_channels

    results = []
    for k, model_dir in enumerate(a.model):
        site = a.cohort[k if len(a.cohort) > 1 else 0]
        model, meta = load_bundle(model_dir)
        cfg = train_config_from_meta(meta, device="cpu").resolved()
        from shared.tasks import get_task

        spec = get_task(meta["task"])
        samples, _ = select_samples(spec, read_cohort(site))
        samples = [s for s in samples if "seg" in s.case.images and s.label != "healthy"][: a.cases]
        rows = explain_cases(model, samples, spec, cfg, methods=methods,
                             occlusion_window=a.occlusion_window or None)
        ds = _dataset(samples, spec, cfg, train=False, in_channels=_first_conv_in_channels(model),
                      with_seg=True)
        chance = [chance_share(ds, i) for i in range(len(samples))]
        rng = np.random.default_rng(0)
        occ = [occlusion(model.eval(), ds, i, rng, spec.classes.index(s.label))
               for i, s in enumerate(samples)]
        for r, o in zip(rows, occ, strict=True):
            r.update({"drop_lesion": o["lesion"], **{f"kept_{f}": o[f"kept_{f}"] for f in FILLS}})
        rows = [r for r, c in zip(rows, chance, strict=True) if not np.isnan(c)]
        chance = [c for c in chance if not np.isnan(c)]
        cam = mean_ci([r["cam_inside"] for r in rows])
        sal = mean_ci([r["saliency_inside"] for r in rows])
        by_method = {m: [round(v, 3) for v in mean_ci([r[f"saliency_inside_{m}"] for r in rows])]
                     for m in methods}
        ch = mean_ci(chance)
        per_class = {}
        for label in sorted({r["label"] for r in rows}):
            sel = [r for r in rows if r["label"] == label]
            per_class[label] = {"n": len(sel),
                                **{m: round(float(np.nanmean([r[f"saliency_inside_{m}"] for r in sel])), 3)
                                   for m in methods},
                                "cam": round(float(np.nanmean([r["cam_inside"] for r in sel])), 3),
                                "drop_lesion": round(float(np.nanmean([r["drop_lesion"] for r in sel])), 3),
                                "right": int(sum(r["predicted"] == label for r in sel)),
                                **{f"kept_{f}": int(np.nansum([r[f"kept_{f}"] for r in sel])) for f in FILLS}}
        res = {"task": spec.name, "network": meta["network"]["name"], "model": str(model_dir),
               "cohort": str(site), "occlusion_window": a.occlusion_window or "default", "n": len(rows),
               "saliency_inside": [round(x, 3) for x in sal], "saliency_by_method": by_method,
               "cam_inside": [round(x, 3) for x in cam],
               "chance": [round(x, 3) for x in ch], "target_saliency": TARGET_SALIENCY,
               "occlusion_drop_lesion": [round(x, 3) for x in mean_ci([o["lesion"] for o in occ])],
               "occlusion_drop_elsewhere": [round(x, 3) for x in mean_ci([o["elsewhere"] for o in occ])],
               "met": bool(sal[0] >= TARGET_SALIENCY), "per_class": per_class}
        results.append(res)
        print(json.dumps(res), flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
