"""One simulated DCE-MRI case: tissue block, tumour, vascular tree, transport, SPGR signal with noise.

Parameter ranges follow science.md 3.7 (sampling ranges, not claims). Normal tissue is a smooth mix
of grey- and white-matter-like perfusion with an intact blood-brain barrier (tiny PS). An LGG is a
mildly perfused, barely leaky mass; an HGG has a leaky, hyper-perfused rim around an (often) necrotic
core. The ranges overlap, so no single parameter separates the grades perfectly.

The arterial input is a Parker population curve scaled per patient (cardiac output), delayed to the
block's inlet and dispersed on the way, then delayed and dispersed again along the tree to every
terminal: a population-AIF fit meets the mismatch, delay and dispersion it meets in patients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from shared.qtm.transport import FlowField, TransportResult, solve_darcy, transport
from shared.qtm.vessels import VascularTree, grow_tree, rasterise_vessels, tree_flows

GRADES = ("LGG", "HGG")
MAP_NAMES = ("fp", "vp", "ve", "ps", "ktrans", "umag")  # ground truth written for every case
MAP_UNITS = {"fp": "ml/100ml/min", "vp": "fraction", "ve": "fraction", "ps": "1/min",
             "ktrans": "1/min", "umag": "mm/s"}


@dataclass(frozen=True)
class Protocol:
    """An acquisition protocol: timing and SPGR sequence (one per site in federated experiments)."""

    frame_s: float = 5.0
    duration_s: float = 300.0
    tr_s: float = 0.005
    flip_deg: float = 15.0
    t10_s: float = 1.4
    r1: float = 4.5
    snr: float = 40.0  # baseline signal / noise sigma
    m0: float = 1000.0

    def frame_times(self) -> np.ndarray:
        return np.arange(0.0, self.duration_s + 1e-9, self.frame_s)


@dataclass
class CaseParams:
    """The random draws that define a case (kept in its sidecar for provenance)."""

    grade: str
    seed: int
    shape: tuple[int, int, int]
    spacing: float
    tumour_centre: tuple[float, float, float]
    tumour_radius_mm: float
    necrotic: bool
    aif_scale: float
    bolus_arrival_s: float
    inlet_dispersion_s: float
    background_fp: float
    tumour: dict[str, float] = field(default_factory=dict)


@dataclass
class SimulatedCase:
    params: CaseParams
    protocol: Protocol
    times_s: np.ndarray
    concentration: np.ndarray  # [X, Y, Z, T] true tissue concentration incl. large vessels (mM)
    signal: np.ndarray  # [X, Y, Z, T] SPGR signal with Rician noise
    maps: dict[str, np.ndarray]  # ground truth, MAP_NAMES
    seg: np.ndarray  # 0 background, 4 enhancing/viable tumour, 1 necrotic core
    budget_error: float
    tree: VascularTree

    def noisy_concentration(self) -> np.ndarray:
        """Concentration as a scanner would give it: from the noisy signal (known T10)."""
        from shared.dce.signal import signal_to_conc

        p = self.protocol
        n_base = baseline_frames(self.params.bolus_arrival_s, p.frame_s)
        conc = signal_to_conc(self.signal.astype(np.float64), p.t10_s, p.r1, p.tr_s, p.flip_deg,
                              n_baseline=n_base)
        return np.nan_to_num(conc, nan=0.0, posinf=0.0, neginf=0.0)


def baseline_frames(arrival_s: float, frame_s: float) -> int:
    return max(int(arrival_s // frame_s), 1)


def _smooth_field(shape: tuple[int, int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (f - f.mean()) / max(f.std(), 1e-12)


def _tumour_masks(shape, spacing, rng, radius_mm, necrotic):
    """Irregular blob (radius modulated by a smooth field) and, for HGG, its necrotic core."""
    centre = np.array([rng.uniform(0.35, 0.65) * s for s in shape]) * spacing
    grid = np.stack(np.meshgrid(*[(np.arange(s) + 0.5) * spacing for s in shape], indexing="ij"), -1)
    stretch = rng.uniform(0.75, 1.3, size=3)
    dist = np.linalg.norm((grid - centre) / stretch, axis=-1)
    wobble = 1 + 0.25 * _smooth_field(shape, rng, 2.5)
    tumour = dist < radius_mm * wobble
    core = tumour & (dist < radius_mm * wobble * rng.uniform(0.35, 0.6)) if necrotic else np.zeros(shape, bool)
    return tumour, core, tuple(float(c) for c in centre)


def _draw_tumour(grade: str, rng: np.random.Generator) -> dict[str, float]:
    """Viable-tumour parameters; HGG and LGG ranges overlap on purpose."""
    if grade == "HGG":
        return {"fp": rng.uniform(25, 110), "vp": rng.uniform(0.025, 0.10),
                "ve": rng.uniform(0.12, 0.45), "ps": float(np.exp(rng.uniform(np.log(0.015), np.log(0.25))))}
    return {"fp": rng.uniform(12, 50), "vp": rng.uniform(0.012, 0.045),
            "ve": rng.uniform(0.06, 0.30), "ps": float(np.exp(rng.uniform(np.log(0.001), np.log(0.04))))}


def parameter_maps(params: CaseParams, rng: np.random.Generator):
    """Target Fp, vp, ve, PS maps and the segmentation for a case."""
    shape, h = params.shape, params.spacing
    grey = 1 / (1 + np.exp(-1.5 * _smooth_field(shape, rng, 3.0)))  # 0 = WM-like, 1 = GM-like
    fp = params.background_fp * (0.55 + 0.9 * grey)
    vp = 0.012 + 0.03 * grey
    ve = 0.02 + 0.03 * grey
    ps = 1e-4 + 8e-4 * grey
    tumour, core, centre = _tumour_masks(shape, h, rng, params.tumour_radius_mm, params.necrotic)
    params.tumour_centre = centre
    het = np.exp(0.2 * _smooth_field(shape, rng, 1.5))  # intratumoural heterogeneity
    t = params.tumour
    viable = tumour & ~core
    for arr, key in ((fp, "fp"), (vp, "vp"), (ve, "ve"), (ps, "ps")):
        arr[viable] = t[key] * het[viable]
    fp[core] = rng.uniform(2, 6)
    vp[core] = 0.006
    ve[core] = rng.uniform(0.3, 0.5)
    ps[core] = rng.uniform(0.002, 0.01)
    seg = np.zeros(shape, np.uint8)
    seg[viable] = 4
    seg[core] = 1
    return fp, vp, ve, ps, seg


def arterial_input(t_s: np.ndarray, params: CaseParams) -> np.ndarray:
    """Plasma concentration at the block's inlet: scaled, delayed, dispersed Parker AIF."""
    from shared.dce.aif import parker_aif

    fine = np.arange(0.0, float(t_s.max()) + 1.0, 0.1)
    ca = params.aif_scale * np.asarray(parker_aif(fine, params.bolus_arrival_s))
    return np.interp(t_s, fine, _disperse(ca[None], 0.1, np.array([params.inlet_dispersion_s]))[0])


def _disperse(curves: np.ndarray, dt: float, tau_s: np.ndarray) -> np.ndarray:
    """Convolve each row with a unit-area exponential of time constant tau (recursive, exact for steps)."""
    a = np.exp(-dt / np.maximum(tau_s, 1e-6))
    out = np.empty_like(curves)
    y = np.zeros(curves.shape[0])
    for n in range(curves.shape[1]):
        y = a * y + (1 - a) * curves[:, n]
        out[:, n] = y
    return out


def simulate_case(grade: str, seed: int, protocol: Protocol | None = None,
                  shape: tuple[int, int, int] = (32, 32, 16), spacing: float = 2.0,
                  terminal_fraction: float = 0.12) -> SimulatedCase:
    """Simulate one case end to end (deterministic in ``seed``)."""
    if grade not in GRADES:
        raise ValueError(f"grade must be one of {GRADES}, got {grade!r}")
    protocol = protocol or Protocol()
    rng = np.random.default_rng(seed)
    params = CaseParams(
        grade=grade, seed=seed, shape=tuple(shape), spacing=spacing, tumour_centre=(0, 0, 0),
        tumour_radius_mm=float(rng.uniform(6, 12)),
        necrotic=bool(grade == "HGG" and rng.random() < 0.7),
        aif_scale=float(rng.uniform(0.7, 1.3)), bolus_arrival_s=float(rng.uniform(8, 20)),
        inlet_dispersion_s=float(rng.uniform(1.0, 4.0)), background_fp=float(rng.uniform(20, 40)),
        tumour=_draw_tumour(grade, rng),
    )
    fp, vp, ve, ps, seg = parameter_maps(params, rng)
    vol = spacing**3
    # arterial terminals, denser where more flow is wanted; each carries its neighbourhood's demand
    n_vox = int(np.prod(shape))
    weights = fp.ravel() / fp.sum()
    n_term = max(int(terminal_fraction * n_vox), 4)
    term_idx = rng.choice(n_vox, size=n_term, replace=False, p=weights)
    demand = fp.sum() / 6000.0 * vol  # total plasma flow, mm^3/s
    term_q = np.full(n_term, demand / n_term)
    src = np.zeros(n_vox)
    np.add.at(src, term_idx, term_q)
    venous = rng.random(n_vox) < terminal_fraction
    drain = np.where(venous, 1.0, 0.0).reshape(shape)
    conductivity = fp / fp.mean()  # capillary-bed conductance follows the intended perfusion
    flow = solve_darcy(conductivity, src.reshape(shape), drain * 4.0, spacing)
    # the tree: inlet at the centre of the x=0 face
    centres = (np.stack(np.unravel_index(term_idx, shape), -1) + 0.5) * spacing
    inlet = np.array([0.0, shape[1] * spacing / 2, shape[2] * spacing / 2])
    points, parent, term_of = grow_tree(inlet, centres)
    tree = tree_flows(points, parent, term_of, term_q)
    # transit (flow-weighted) and dispersion per arterial source voxel
    src_flat = np.nonzero(src)[0]
    tr_sum = np.zeros(n_vox)
    q_sum = np.zeros(n_vox)
    is_term = term_of >= 0
    np.add.at(tr_sum, np.asarray(term_idx)[term_of[is_term]], tree.transit[is_term] * tree.flow[is_term])
    np.add.at(q_sum, np.asarray(term_idx)[term_of[is_term]], tree.flow[is_term])
    transit = tr_sum[src_flat] / np.maximum(q_sum[src_flat], 1e-30)
    disp = 0.3 + 0.5 * transit

    def inflow_conc(t: np.ndarray) -> np.ndarray:
        fine_dt = 0.1
        fine = np.arange(0.0, float(t.max()) + 2 * fine_dt, fine_dt)
        ca_in = arterial_input(fine, params)
        delayed = np.stack([np.interp(fine - d, fine, ca_in, left=0.0) for d in transit])
        dispersed = _disperse(delayed, fine_dt, disp)
        return np.stack([np.interp(t, fine, row) for row in dispersed])

    times = protocol.frame_times()
    result: TransportResult = transport(flow, vp, ve, ps, inflow_conc, times)
    # large vessels: blood (plasma x (1 - hct)) that flows past on its way to the terminals
    vfrac, vtransit = rasterise_vessels(tree, tuple(shape), spacing)
    hct = 0.42
    ca_inlet = arterial_input(times, params)
    conc = result.tissue.astype(np.float64)
    if (vfrac > 0).any():
        idx = np.nonzero(vfrac)
        curves = np.stack([np.interp(times - d, times, ca_inlet, left=0.0) for d in vtransit[idx]])
        conc[idx] += (vfrac[idx] * (1 - hct))[:, None] * curves
    signal = _spgr_with_noise(conc, protocol, rng)
    fp_true = flow.plasma_flow()
    maps = _ground_truth(flow, fp_true, vp, ve, ps)
    return SimulatedCase(params, protocol, times, conc.astype(np.float32), signal, maps, seg,
                         result.budget_error, tree)


def _simulate_job(job: tuple) -> SimulatedCase:
    grade, case_seed, protocol, shape = job
    return simulate_case(grade, case_seed, protocol, shape=shape)


def simulate_cases(jobs: list[tuple], workers: int = 1):
    """Cases for ``(grade, seed, protocol, shape)`` jobs, in order, here or in ``workers`` processes.

    A generator: with spawn-started workers, the calling script needs a ``__main__`` guard.
    """
    if workers <= 1:
        yield from map(_simulate_job, jobs)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_simulate_job, jobs)


def _ground_truth(flow: FlowField, fp, vp, ve, ps) -> dict[str, np.ndarray]:
    from shared.dce.models import ktrans_from_2cxm

    return {"fp": fp.astype(np.float32), "vp": vp.astype(np.float32), "ve": ve.astype(np.float32),
            "ps": ps.astype(np.float32), "ktrans": ktrans_from_2cxm(fp, ps).astype(np.float32),
            "umag": flow.darcy_speed().astype(np.float32)}


def _spgr_with_noise(conc: np.ndarray, p: Protocol, rng: np.random.Generator) -> np.ndarray:
    from shared.dce.signal import conc_to_signal

    clean = np.asarray(conc_to_signal(conc, p.m0, p.t10_s, p.r1, p.tr_s, p.flip_deg))
    sigma = float(clean[..., 0].mean()) / p.snr
    real = clean + rng.normal(0, sigma, clean.shape)
    imag = rng.normal(0, sigma, clean.shape)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


def case_summary(case: SimulatedCase) -> dict:
    """JSON-ready provenance of a case (its draws and protocol)."""
    p = asdict(case.params)
    p["shape"] = list(p["shape"])
    return {"params": p, "protocol": asdict(case.protocol), "budget_error": case.budget_error,
            "segments": case.tree.num_segments}
