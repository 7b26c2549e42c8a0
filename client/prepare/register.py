"""Bias correction and registration with SimpleITK: N4, rigid co-registration within a session,
affine (optionally B-spline) registration of the reference sequence to nilearn's MNI152 template,
resampling onto the template grid.

Arrays are NIfTI-style (x, y, z) with RAS affines; SimpleITK images are LPS. A registration returns a
transform that maps *fixed* points to *moving* points (SimpleITK's convention), so the composite
``seq <- ref <- template`` resamples a sequence straight onto the template grid in one interpolation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

_FLIP = np.array([-1.0, -1.0, 1.0])
SEED = 1  # metric sampling seed: the same session always gives the same result


def _seed(seed: int) -> int:
    """A fixed sampling seed; SimpleITK reads 0 as "seed from the wall clock", never wanted here."""
    if seed == 0:
        raise ValueError("seed 0 means a wall-clock seed in SimpleITK: use a fixed seed >= 1")
    return seed


def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """(x, y, z) array + RAS affine -> LPS SimpleITK image (direction must be orthogonal)."""
    lin = affine[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    direction = (_FLIP[:, None] * lin) / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise ValueError("affine is sheared (non-orthogonal axes): not supported")
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, np.float32).transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in _FLIP * affine[:3, 3]])
    img.SetDirection([float(v) for v in direction.ravel()])
    return img


def from_sitk(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """LPS SimpleITK image -> ((x, y, z) array, RAS affine)."""
    data = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    aff = np.eye(4)
    aff[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
    aff[:3, 3] = img.GetOrigin()
    return data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff


def coarse(img: sitk.Image, mm: float = 2.0) -> sitk.Image:
    """``img`` on voxels of about ``mm`` (same axes and extent): what the registrations and N4 see
    (their finest level is 2 mm; full-resolution inputs only cost time). Whole factors per axis are
    block averages (BinShrink: one pass, anti-aliased); other ratios are Gaussian-smoothed and
    resampled."""
    sp = np.asarray(img.GetSpacing(), float)
    if sp.min() >= mm - 1e-6:
        return img
    img = sitk.Cast(img, sitk.sitkFloat32)
    ratio = np.maximum(mm / sp, 1.0)
    factors = np.maximum(1, np.floor(ratio + 0.25)).astype(int)
    if np.all(np.abs(ratio - factors) <= 0.25):
        return sitk.BinShrink(img, [int(f) for f in factors])
    new_sp = np.maximum(sp, mm)
    sigma = np.sqrt(np.maximum(new_sp**2 - sp**2, 0.0)) / 2.355
    sm = sitk.SmoothingRecursiveGaussian(img, sigma.tolist())
    size = np.ceil(np.asarray(img.GetSize()) * sp / new_sp).astype(int)
    ref = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    ref.SetSpacing(new_sp.tolist())
    ref.SetDirection(img.GetDirection())
    # keep the physical extent: first voxel centre moves by half the voxel-size change
    shift = np.asarray(img.GetDirection()).reshape(3, 3) @ ((new_sp - sp) / 2)
    ref.SetOrigin((np.asarray(img.GetOrigin()) + shift).tolist())
    return sitk.Resample(sm, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def head_mask(img: sitk.Image) -> sitk.Image:
    """Foreground (head) by Otsu on a smoothed copy, largest component, holes filled."""
    sm = sitk.SmoothingRecursiveGaussian(img, 2.0)
    fg = sitk.OtsuThreshold(sm, 0, 1)
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(fg), sortByObjectSize=True)
    return sitk.BinaryFillhole(sitk.Cast(cc == 1, sitk.sitkUInt8))


@dataclass
class BiasField:
    """N4's multiplicative bias as a smooth log field on a coarse grid; ``offset`` is the intensity
    shift N4 ran on (its log needs values > 0)."""

    log: sitk.Image
    offset: float

    def correct(self, img: sitk.Image, transform: sitk.Transform | None = None) -> sitk.Image:
        """``img`` divided by the bias, the field resampled onto ``img``'s grid through
        ``transform`` (grid point -> the field's scanner point; identity when None)."""
        log = sitk.Resample(self.log, img, transform or sitk.Transform(), sitk.sitkLinear, 0.0,
                            sitk.sitkFloat32, True)  # nearest-value extrapolation at the edges
        img = sitk.Cast(img, sitk.sitkFloat32)
        if not self.offset:
            return img / sitk.Exp(log)
        return (img + self.offset) / sitk.Exp(log) - self.offset


def bias_field(img: sitk.Image, voxel_mm: float = 8.0, iterations: tuple[int, ...] = (30, 25, 20)
               ) -> BiasField:
    """N4 bias-field estimate on a copy of ``img`` shrunk to about ``voxel_mm`` voxels (three
    B-spline fitting levels); the field stays coarse and is applied where it is needed
    (:meth:`BiasField.correct`: the registration copy, then once on the output grid)."""
    img = sitk.Cast(img, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(img)
    lo = float(np.percentile(arr[::2, ::2, ::2], 0.5))
    offset = 1.0 - lo if lo <= 0 else 0.0  # N4 works on log intensities: keep them > 0
    small = coarse(img + offset if offset else img, voxel_mm)
    f = sitk.N4BiasFieldCorrectionImageFilter()
    f.SetMaximumNumberOfIterations(list(iterations))
    f.Execute(small, head_mask(small))
    return BiasField(f.GetLogBiasFieldAsImage(small), offset)


def n4(img: sitk.Image, voxel_mm: float = 8.0) -> sitk.Image:
    """``img`` bias-corrected by N4 (estimated at ``voxel_mm``, applied on ``img``'s own grid)."""
    return bias_field(img, voxel_mm).correct(img)


@dataclass
class RegResult:
    transform: sitk.Transform  # fixed point -> moving point
    metric: float  # final Mattes mutual information (lower is better)


def levels(img: sitk.Image, targets_mm: tuple[float, ...]) -> tuple[list[int], list[float]]:
    """Shrink factors giving about ``targets_mm`` voxels on ``img`` (repeats dropped), with Gaussian
    smoothing sigmas (mm) of half the target."""
    sp = min(img.GetSpacing())
    shrink, smooth = [], []
    for t in targets_mm:
        f = max(1, round(t / sp))
        if not shrink or f < shrink[-1]:
            shrink.append(f)
            smooth.append(t / 2 if f > 1 else 0.0)
    return shrink, smooth


# Metric samples per resolution level (before the masks drop those outside them): every level gets
# about as many as it has voxels up to this count. A fixed *percentage* left the coarsest level with a
# few hundred samples in the brain, a noisy metric on which the similarity stage of the template
# registration wandered off (7-8 mm landmark error) for some sampling seeds; the finest levels need
# no more than this.
SAMPLES_PER_LEVEL = 40_000


def _percentages(fixed: sitk.Image, shrink: list[int], samples: int = SAMPLES_PER_LEVEL
                 ) -> list[float]:
    n = float(np.prod(fixed.GetSize()))
    return [min(1.0, samples * f**3 / n) for f in shrink]


def _method(fixed: sitk.Image, shrink: list[int], smooth: list[float], iters: int, seed: int
            ) -> sitk.ImageRegistrationMethod:
    """Mattes MI, random samples (fixed seed), regular-step gradient descent to 0.01 mm steps."""
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentagePerLevel(_percentages(fixed, shrink), _seed(seed))
    r.SetInterpolator(sitk.sitkLinear)
    r.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=0.01,
                                               numberOfIterations=iters, relaxationFactor=0.6,
                                               gradientMagnitudeTolerance=1e-6)
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetShrinkFactorsPerLevel(shrink)
    r.SetSmoothingSigmasPerLevel(smooth)
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return r


def rigid(fixed: sitk.Image, moving: sitk.Image, seed: int = SEED) -> RegResult:
    """Rigid (Euler) co-registration of ``moving`` to ``fixed`` by Mattes MI, scanner geometry first."""
    fixed, moving = sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32)
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.GEOMETRY)
    init = sitk.Euler3DTransform(init)
    init.SetTranslation((0.0, 0.0, 0.0))  # same scanner frame: start from the DICOM geometry
    r = _method(fixed, *levels(fixed, (8.0, 4.0, 2.0)), 100, seed)
    r.SetInitialTransform(init, inPlace=False)
    fmask = head_mask(fixed)
    r.SetMetricFixedMask(fmask)
    out = r.Execute(sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32))
    return RegResult(out, float(r.GetMetricValue()))


# The template's field of view (mm): nilearn's 2 mm MNI152 grid, 99x117x95 voxels from (-98, -134, -72)
TEMPLATE_FOV_MM = (198.0, 234.0, 190.0)


@functools.lru_cache(maxsize=4)
def template(spacing: float = 2.0) -> tuple[sitk.Image, sitk.Image]:
    """nilearn's MNI152 2009 T1 template and brain mask on the template's field of view at
    ``spacing`` mm (the grid every prepared session is written on); the 1 mm files are read only
    for spacings under 2 mm."""
    from nilearn import datasets

    res = 1 if spacing < 2.0 else 2
    t1 = datasets.load_mni152_template(resolution=res)
    bm = datasets.load_mni152_brain_mask(resolution=res)
    t1_img = to_sitk(np.asarray(t1.get_fdata(), np.float32), np.asarray(t1.affine, float))
    bm_img = to_sitk(np.asarray(bm.get_fdata(), np.float32), np.asarray(bm.affine, float))
    grid = output_grid(t1_img, spacing)
    t1_s = sitk.Resample(t1_img, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    bm_s = sitk.Resample(bm_img, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return t1_s, sitk.Cast(bm_s > 0.5, sitk.sitkUInt8)


def output_grid(tpl: sitk.Image, spacing: float) -> sitk.Image:
    """The template's field of view at ``spacing`` mm, same origin and axes as ``tpl``."""
    ref = sitk.Image([int(np.ceil(f / spacing - 1e-6)) for f in TEMPLATE_FOV_MM], sitk.sitkFloat32)
    ref.SetSpacing([spacing] * 3)
    ref.SetOrigin(tpl.GetOrigin())
    ref.SetDirection(tpl.GetDirection())
    return ref


# Starting sizes (template -> scanner) of the similarity stage. From size 1 alone the stage settled,
# for some cases and sampling seeds, where the template brain spans the brain and its surroundings
# (8 % too large, 6-8 mm landmark error: issue 15's failed metastasis round trip), with a metric no
# worse than the right fit's; only the brain-restricted second pass tells them apart. So every
# distinct start is carried through both passes and the best brain-restricted fit wins.
START_SCALES = (0.9, 1.0, 1.1)


def to_template(moving: sitk.Image, seed: int = SEED) -> list[RegResult]:
    """First affine registrations of a head image to the MNI152 template (fixed: the template at 2 mm
    within its dilated brain mask): centres of mass, an exhaustive search over rotations (+-24 deg
    per axis, 8 mm), similarity from each of :data:`START_SCALES`, then affine, by Mattes MI; one
    result per distinct outcome of the similarity stage."""
    fixed, brain = template(2.0)
    fmask = sitk.BinaryDilate(brain, [3, 3, 3])
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    head = head_mask(moving)
    init = sitk.CenteredTransformInitializer(brain, head, sitk.Euler3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    search = sitk.ImageRegistrationMethod()
    search.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    search.SetMetricSamplingStrategy(search.RANDOM)
    search.SetMetricSamplingPercentagePerLevel(_percentages(fixed, [4]), _seed(seed))
    search.SetInterpolator(sitk.sitkLinear)
    search.SetOptimizerAsExhaustive([2, 2, 2, 0, 0, 0], stepLength=float(np.deg2rad(12.0)))
    search.SetOptimizerScales([1.0] * 6)
    search.SetShrinkFactorsPerLevel([4])
    search.SetSmoothingSigmasPerLevel([4.0])
    search.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    search.SetInitialTransform(init, inPlace=True)
    search.SetMetricFixedMask(fmask)
    search.Execute(fixed, moving)
    sims: list[sitk.Transform] = []
    for scale in START_SCALES:
        sim0 = sitk.Similarity3DTransform()
        sim0.SetCenter(init.GetCenter())
        sim0.SetMatrix(init.GetMatrix())
        sim0.SetTranslation(init.GetTranslation())
        sim0.SetScale(scale)
        r = _method(fixed, [4, 2], [4.0, 2.0], 100, seed)
        r.SetInitialTransform(sim0, inPlace=False)
        r.SetMetricFixedMask(fmask)
        sim = r.Execute(fixed, moving)
        if all(_gap_mm(sim, other, brain) > 2.0 for other in sims):
            sims.append(sim)
    out = []
    for sim in sims:
        r = _method(fixed, [4, 2], [2.0, 1.0], 100, seed)
        r.SetInitialTransform(_as_affine(sim, init.GetCenter()), inPlace=False)
        r.SetMetricFixedMask(fmask)
        out.append(RegResult(r.Execute(fixed, moving), float(r.GetMetricValue())))
    return out


def _gap_mm(a: sitk.Transform, b: sitk.Transform, box: sitk.Image) -> float:
    """Largest distance between where ``a`` and ``b`` send the corners of ``box``'s extent."""
    size = box.GetSize()
    corners = [box.TransformContinuousIndexToPhysicalPoint([float(c) for c in (i, j, k)])
               for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    return max(float(np.linalg.norm(np.subtract(a.TransformPoint(p), b.TransformPoint(p))))
               for p in corners)


def register_to_template(moving: sitk.Image, seed: int = SEED, deformable: bool = False
                         ) -> RegResult:
    """The reference image's template -> scanner transform: every first pass (:func:`to_template`)
    refined with the image restricted to its brain, the best refined metric kept; ``deformable``
    adds a coarse B-spline on top."""
    fixed, brain = template(2.0)
    best: RegResult | None = None
    for first in to_template(moving, seed):
        brain_native = resample(brain, moving, first.transform.GetInverse(), label=True)
        res = refine_to_template(moving, brain_native, first.transform, seed)
        if best is None or res.metric < best.metric:
            best = res
    assert best is not None  # to_template returns at least one start
    if deformable:
        fmask = sitk.BinaryDilate(brain, [2, 2, 2])
        centre = fixed.TransformContinuousIndexToPhysicalPoint([s / 2 for s in fixed.GetSize()])
        flat = _as_affine(best.transform, centre)  # a composite inside a composite cannot be written
        best = RegResult(_bspline(fixed, sitk.Cast(moving, sitk.sitkFloat32), flat, fmask, seed),
                         best.metric)
    return best


def refine_to_template(moving: sitk.Image, brain_native: sitk.Image, start: sitk.Transform,
                       seed: int = SEED) -> RegResult:
    """Second affine pass with the moving image restricted to its (dilated) brain: the skull and the
    neck no longer pull the fit."""
    fixed, brain = template(2.0)
    fmask = sitk.BinaryDilate(brain, [2, 2, 2])
    mmask = sitk.BinaryDilate(brain_native, [2, 2, 2])
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    centre = fixed.TransformContinuousIndexToPhysicalPoint([s / 2 for s in fixed.GetSize()])
    aff0 = _as_affine(start, centre)
    r = _method(fixed, [2, 1], [1.0, 0.0], 100, seed)
    r.SetInitialTransform(aff0, inPlace=False)
    r.SetMetricFixedMask(fmask)
    r.SetMetricMovingMask(mmask)
    aff = r.Execute(fixed, moving)
    return RegResult(aff, float(r.GetMetricValue()))


def _bspline(fixed, moving, affine: sitk.Transform, fmask, seed: int) -> sitk.Transform:
    """Coarse B-spline (mesh 6^3 over the template) on top of the affine, LBFGS-B."""
    bs = sitk.BSplineTransformInitializer(fixed, [6, 6, 6])
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(32)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(0.1, _seed(seed))
    r.SetInterpolator(sitk.sitkLinear)
    r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=40)
    r.SetShrinkFactorsPerLevel([2, 1])
    r.SetSmoothingSigmasPerLevel([1.0, 0.0])
    r.SetMovingInitialTransform(affine)
    r.SetInitialTransform(bs, inPlace=True)
    r.SetMetricFixedMask(fmask)
    r.Execute(fixed, moving)
    return sitk.CompositeTransform([affine, bs])


def _as_affine(t: sitk.Transform, centre) -> sitk.AffineTransform:
    """An AffineTransform about ``centre`` equal to the affine-like ``t``."""
    comp = sitk.CompositeTransform(t)
    out = sitk.AffineTransform(3)
    out.SetCenter(tuple(centre))
    out.SetMatrix(_linear(comp).ravel().tolist())
    out.SetTranslation(_translation_about(comp, centre))
    return out


def _linear(t: sitk.Transform) -> np.ndarray:
    """Linear part of a (composite of) affine-like transform(s), by finite differences."""
    p0 = np.array(t.TransformPoint((0.0, 0.0, 0.0)))
    return np.stack([np.array(t.TransformPoint(tuple(e))) - p0 for e in np.eye(3)], axis=1)


def _translation_about(t: sitk.Transform, centre) -> list[float]:
    """Translation of an AffineTransform with ``centre`` that reproduces ``t`` (assumed affine)."""
    c = np.asarray(centre, float)
    return (np.array(t.TransformPoint(tuple(c))) - c).tolist()


def linear_part(t: sitk.Transform) -> np.ndarray:
    """The transform's linear part (for the brain volume: |det| = native mm^3 per template mm^3)."""
    return _linear(t)


def resample(img: sitk.Image, grid: sitk.Image, transform: sitk.Transform, label: bool = False
             ) -> sitk.Image:
    """``img`` on ``grid`` through ``transform`` (grid point -> img point): linear, or nearest for
    label images (masks keep their integer labels)."""
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    ptype = sitk.sitkUInt8 if label else sitk.sitkFloat32
    return sitk.Resample(img, grid, transform, interp, 0.0, ptype)


def chain(*transforms: sitk.Transform) -> sitk.Transform:
    """``chain(a, b)(x) = a(b(x))``: b applied first (grid -> reference -> sequence)."""
    return sitk.CompositeTransform([sitk.Transform(t) for t in transforms])
