"""gliofed simulations package."""
