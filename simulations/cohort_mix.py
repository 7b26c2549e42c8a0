"""Class mixes of gliofed's generated cohorts: one source for the generator, the CLI and the harness.

No heavy imports here: the CLI reads these for its option defaults before it loads anything else.
"""

RECURRENCE_RATIO = 0.82  # share of recurrence (vs radiation necrosis) sessions: the clinical mix
