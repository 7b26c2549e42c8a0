"""gliofed shared package."""
