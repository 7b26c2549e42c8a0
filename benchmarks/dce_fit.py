"""Benchmark: batched torch 2CXM fitting (shared.dce.fit) vs scipy curve_fit per voxel, same run.

Synthetic 2CXM curves (N voxels x T frames, Parker AIF, per-voxel delay, Gaussian noise) with known
parameters; the torch fit runs on all N voxels, scipy.optimize.curve_fit (trf, bounded, the same
exact forward model written in numpy, OSIPI start values) on the first --scipy-sample voxels.
Prints voxels/s for both, the speed-up, and the accuracy of both against ground truth.

CPU (dev box):  .venv/bin/python benchmarks/dce_fit.py --voxels 20000 --scipy-sample 200
H100:           python benchmarks/dce_fit.py --voxels 1000000 --device cuda --chunk-size 250000
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from shared.dce import parker_aif, twocxm
from shared.dce.fit import BOUNDS_2CXM, fit_2cxm, pick_device


def sample_truth(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Half LGG-like, half HGG-like parameters (science.md 3.7), delays 0-5 s."""
    hgg = rng.random(n) < 0.5
    return {
        "fp": np.where(hgg, rng.uniform(30, 120, n), rng.uniform(10, 40, n)),
        "ps": np.where(hgg, rng.uniform(0.03, 0.3, n), rng.uniform(0.005, 0.03, n)),
        "ve": np.where(hgg, rng.uniform(0.15, 0.5, n), rng.uniform(0.05, 0.25, n)),
        "vp": np.where(hgg, rng.uniform(0.03, 0.12, n), rng.uniform(0.01, 0.04, n)),
        "delay": rng.uniform(0.0, 5.0, n),
    }


def _weights(k: float, x: float) -> tuple[float, float]:
    """∫_0^x e^{-k(x-u)} du and ∫_0^x u e^{-k(x-u)} du (series for small k x)."""
    if k * x < 1e-4:
        return x * (1 - k * x / 2), x * x * (0.5 - k * x / 6)
    a = -np.expm1(-k * x) / k
    return a, (x - a) / k


def numpy_2cxm(t_s: np.ndarray, ca: np.ndarray, fp, ps, ve, vp, delay) -> np.ndarray:
    """Exact 2CXM for one voxel in plain numpy (scipy's model): same maths as shared.dce.models."""
    t = t_s / 60.0
    step = t[1] - t[0]
    f = fp / 100.0
    vp_, ve_ = max(vp, 1e-9), max(ve, 1e-9)
    total = (ps * (vp_ + ve_) + f * ve_) / (vp_ * ve_)
    prod = f * ps / (vp_ * ve_)
    root = np.sqrt(max(total * total - 4 * prod, 0.0))
    sig_p, sig_m = (total + root) / 2, 2 * prod / max(total + root, 1e-300)
    gap = max(sig_p - sig_m, 1e-12)
    amps = ((prod * (vp_ + ve_) - f * sig_m) / gap, (f * sig_p - prod * (vp_ + ve_)) / gap)
    slope = np.append(np.diff(ca) / step, 0.0)
    n_shift = int(np.ceil(delay / 60.0 / step - 1e-9))
    h = max(n_shift * step - delay / 60.0, 0.0)
    out = np.zeros_like(t)
    for amp, k in zip(amps, (sig_m, sig_p)):
        a_s, b_s = _weights(k, step)
        g = ca[:-1] * a_s + slope[:-1] * b_s
        grid = np.concatenate(
            [[0.0], np.convolve(g, np.exp(-k * step * np.arange(len(g))))[: len(g)]]
        )
        a_h, b_h = _weights(k, h)
        partial = np.exp(-k * h) * grid + a_h * ca + b_h * slope
        idx = np.arange(len(t)) - n_shift
        valid = (idx >= 0) & (idx < len(t))
        conv = np.zeros_like(t)
        conv[valid] = partial[idx[valid]]
        out += amp * conv
    return out


def accuracy(fitted: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Median and 90th percentile of the relative error per parameter (delay: absolute, s)."""
    ktrans = truth["ps"] * truth["fp"] / 100 / (truth["ps"] + truth["fp"] / 100)
    ref = {**truth, "ktrans": ktrans}
    out = {}
    for name in ("fp", "ps", "ve", "vp", "ktrans"):
        rel = np.abs(fitted[name] - ref[name]) / ref[name]
        rel = np.where(np.isfinite(rel), rel, np.inf)
        out[f"{name}_rel_err_median"] = round(float(np.median(rel)), 4)
        out[f"{name}_rel_err_p90"] = round(float(np.quantile(rel, 0.9)), 4)
    err = np.abs(fitted["delay"] - ref["delay"])
    out["delay_abs_err_s_median"] = round(float(np.median(err)), 3)
    out["delay_abs_err_s_p90"] = round(float(np.quantile(err, 0.9)), 3)
    return out


def plot_fits(
    fitted: dict[str, np.ndarray],
    truth: dict[str, np.ndarray],
    scipy_params: dict[str, np.ndarray],
    path: Path,
) -> None:
    """Fitted vs true per parameter: torch on (up to 5000 of) all voxels, scipy on its sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ktrans = truth["ps"] * truth["fp"] / 100 / (truth["ps"] + truth["fp"] / 100)
    ref = {**truth, "ktrans": ktrans}
    names = ["fp", "ps", "ve", "vp", "ktrans", "delay"]
    units = ["ml/100ml/min", "1/min", "", "", "1/min", "s"]
    n_t = min(5000, len(ref["fp"]))
    n_s = len(scipy_params["fp"])
    fig, axes = plt.subplots(2, 3, figsize=(10.5, 6.8))
    axes = axes.ravel()
    for ax, name, unit in zip(axes, names, units):
        ax.scatter(
            ref[name][:n_t], fitted[name][:n_t], s=2, alpha=0.3, label="torch LM", color="C0"
        )
        ax.scatter(ref[name][:n_s], scipy_params[name], s=8, marker="x", label="scipy", color="C3")
        lo, hi = float(np.min(ref[name])), float(np.max(ref[name]))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(f"{name} ({unit})" if unit else name, fontsize=9)
        ax.set_xlabel("true", fontsize=8)
        ax.set_ylabel("fitted", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, markerscale=3)
    fig.suptitle(
        f"2CXM fits vs ground truth ({len(ref['fp'])} voxels torch, {n_s} scipy)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_scipy(
    curves: np.ndarray, t: np.ndarray, ca: np.ndarray
) -> tuple[dict[str, np.ndarray], float]:
    """Per-voxel bounded curve_fit from the OSIPI start; returns (params, seconds)."""
    from scipy.optimize import curve_fit

    names = list(BOUNDS_2CXM)
    lower = [BOUNDS_2CXM[n][0] for n in names]
    upper = [BOUNDS_2CXM[n][1] for n in names]
    p0 = [BOUNDS_2CXM[n][2] for n in names]
    out = np.zeros((len(curves), len(names)))
    start = time.perf_counter()
    for i, curve in enumerate(curves):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[i], _ = curve_fit(
                    lambda tt, *p: numpy_2cxm(tt, ca, *p),
                    t,
                    curve,
                    p0=p0,
                    bounds=(lower, upper),
                    maxfev=2000,
                )
        except RuntimeError:
            out[i] = np.nan
    seconds = time.perf_counter() - start
    params = {n: out[:, j] for j, n in enumerate(names)}
    params["ktrans"] = params["ps"] * params["fp"] / 100 / (params["ps"] + params["fp"] / 100)
    return params, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, default=20000)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--dt", type=float, default=5.0, help="frame interval (s)")
    parser.add_argument("--noise", type=float, default=0.002, help="Gaussian noise SD (mM)")
    parser.add_argument("--scipy-sample", type=int, default=200)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--chunk-size", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--plot", type=Path, default=None, help="fitted-vs-true scatter PNG")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    t = np.arange(args.frames) * args.dt
    ca = parker_aif(t, 10.0)
    truth = sample_truth(args.voxels, rng)
    curves = np.concatenate(
        [
            twocxm(t, ca, *(truth[k][s : s + 50000] for k in ("fp", "ps", "ve", "vp", "delay")))
            for s in range(0, args.voxels, 50000)
        ]
    )
    curves += rng.normal(0.0, args.noise, curves.shape)
    device = pick_device(args.device)
    if device.type == "cuda":  # warm-up (CUDA context, kernels) outside the timing
        fit_2cxm(curves[:1000], t, ca, device=str(device), dtype=getattr(torch, args.dtype))
        torch.cuda.synchronize()
    start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    res = fit_2cxm(curves, t, ca, device=str(device), chunk_size=args.chunk_size, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    torch_s = time.perf_counter() - start
    fitted = {k: v.numpy() for k, v in res.items()}
    n_s = min(args.scipy_sample, args.voxels)
    sample_truth_ = {k: v[:n_s] for k, v in truth.items()}
    scipy_params, scipy_s = run_scipy(curves[:n_s], t, ca)
    torch_vps, scipy_vps = args.voxels / torch_s, n_s / scipy_s
    report = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({args.threads} threads)",
        "dtype": args.dtype,
        "voxels": args.voxels,
        "frames": args.frames,
        "dt_s": args.dt,
        "noise_mM": args.noise,
        "torch_seconds": round(torch_s, 2),
        "torch_voxels_per_s": round(torch_vps, 1),
        "torch_converged_fraction": float(res["success"].float().mean()),
        "scipy_voxels": n_s,
        "scipy_seconds": round(scipy_s, 2),
        "scipy_voxels_per_s": round(scipy_vps, 2),
        "speedup": round(torch_vps / scipy_vps, 1),
        "torch_accuracy_all": accuracy(fitted, truth),
        "torch_accuracy_sample": accuracy({k: v[:n_s] for k, v in fitted.items()}, sample_truth_),
        "scipy_accuracy_sample": accuracy(scipy_params, sample_truth_),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot_fits(fitted, truth, scipy_params, args.plot)


if __name__ == "__main__":
    main()
