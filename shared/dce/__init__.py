"""DCE-MRI physics for gliofed: population AIF, SPGR signal <-> concentration, tracer-kinetic
forward models (Tofts, extended Tofts, 2CXM) with exact convolution, and batched torch fitting.

Units used throughout (see science.md section 3):
- time in **seconds** at the API (t, delay); the Parker formula itself works in minutes inside.
- concentrations in mM; Ktrans and PS in 1/min; Fp in ml/100ml/min; vp, ve as volume fractions.
"""

from shared.dce.aif import parker_aif, parker_blood
from shared.dce.fit import fit_2cxm, fit_extended_tofts, fit_tofts
from shared.dce.models import extended_tofts, tofts, twocxm
from shared.dce.signal import conc_to_signal, signal_to_conc

__all__ = [
    "conc_to_signal",
    "extended_tofts",
    "fit_2cxm",
    "fit_extended_tofts",
    "fit_tofts",
    "parker_aif",
    "parker_blood",
    "signal_to_conc",
    "tofts",
    "twocxm",
]
