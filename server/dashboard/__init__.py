"""``gliofed dashboard``: a live, read-only web page for one run folder (Starlette on uvicorn)."""
