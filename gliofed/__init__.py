"""gliofed: federated learning for brain-tumour MRI (the CLI composes server, client, shared, simulations)."""

__version__ = "0.1.0"
