"""Synthetic multi-site brain-tumour cohorts on MNI152 anatomy (``gliofed synth``).

Public API: :func:`generate_cohort` (see :mod:`simulations.synth.generate`).
"""

from simulations.synth.generate import generate_cohort, plan_cohort

__all__ = ["generate_cohort", "plan_cohort"]
