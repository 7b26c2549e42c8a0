"""gliofed client package."""
