"""Code shipped inside every MODEL_DIR as ``scripts/`` (so MONAI's bundle runner needs no gliofed).

Everything here imports only the standard library, numpy, torch and MONAI. ``transforms`` is the one
preprocessing definition: gliofed's training/prediction instantiate it, and the bundle's
``configs/inference.json`` carries the same transform list. ``predict`` turns a site folder's
``cohort.csv`` into ``predictions.csv``; ``models`` (copied from ``shared/models.py`` at export) holds
the network classes.
"""
