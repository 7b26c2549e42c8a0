"""gliofed server package."""
