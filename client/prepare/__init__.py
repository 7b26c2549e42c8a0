"""Site-side preparation of raw hospital scans into a site folder (`gliofed site prepare`).

DICOM/NIfTI in, the cohort contract out: conversion (:mod:`.dicom`), N4 and registration
(:mod:`.register`), skull stripping (:mod:`.skullstrip`), de-identification (:mod:`.deid`), QC
(:mod:`.qc`), per-session work (:mod:`.pipeline`) and the parallel, resumable run (:mod:`.batch`).
No Flower here: this runs at the hospital before a SuperNode is started.
"""

from client.prepare.batch import PrepareError, PrepareResult, prepare_site

__all__ = ["PrepareError", "PrepareResult", "prepare_site"]
