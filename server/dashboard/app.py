"""The dashboard's ASGI app (Starlette, served by uvicorn): read-only, one run folder.

Routes (all GET): ``/`` the page; ``/static/*`` its script, charting code and style (package data, no
CDN); ``/api/run`` one JSON snapshot; ``/api/events`` server-sent events, a new snapshot whenever a file
of the run changes; ``/files/NAME`` the report and its PNGs, ``sites.log`` and the JSON logs;
``/files/model.zip`` the exported model bundle. With a token every request must carry it (``?token=``
once, which sets a cookie, or an ``Authorization: Bearer`` header).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import zipfile
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from server.dashboard.data import SERVED_FILES, RunView

STATIC = Path(__file__).parent / "static"
COOKIE = "gliofed_dashboard"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class TokenMiddleware(BaseHTTPMiddleware):
    """Refuse requests without the token; a correct ``?token=`` sets a same-site cookie."""

    def __init__(self, app, token: str) -> None:
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next):
        given = (request.query_params.get("token") or request.cookies.get(COOKIE)
                 or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
        if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
            return PlainTextResponse("401: this dashboard needs its token (?token=...)",
                                     status_code=401)
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
        return response


def create_app(run_dir: str | Path, token: str | None = None, poll_s: float = 1.0) -> Starlette:
    """The dashboard for ``run_dir`` (checked now: a missing or foreign folder raises RunDirError)."""
    view = RunView(run_dir)

    async def index(request: Request) -> Response:
        # the first snapshot is in the page, so it renders before any request of its own returns
        data = json.dumps(view.snapshot()).replace("</", "<\\/")
        page = (STATIC / "index.html").read_text(encoding="utf-8").replace(
            "<!--SNAPSHOT-->", f'<script id="snapshot" type="application/json">{data}</script>')
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def snapshot(request: Request) -> Response:
        return JSONResponse(view.snapshot(), headers={"Cache-Control": "no-store"})

    async def events(request: Request) -> Response:
        async def stream():
            last = None
            idle = 0.0
            while not await request.is_disconnected():
                sig = view.signature()
                if sig != last:
                    last = sig
                    idle = 0.0
                    yield f"data: {json.dumps(view.snapshot())}\n\n"
                elif idle >= 15:
                    idle = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(poll_s)
                idle += poll_s

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def files(request: Request) -> Response:
        name = request.path_params["name"]
        if name == "model.zip":
            return _model_zip(view.dir / "model")
        allowed = name in SERVED_FILES or (name.endswith(".png") and "/" not in name)
        path = view.dir / name
        if not allowed or not path.is_file():
            return PlainTextResponse(f"404: {name} is not in this run folder", status_code=404)
        return FileResponse(path, headers={"Cache-Control": "no-store"})

    routes = [
        Route("/", index),
        Route("/api/run", snapshot),
        Route("/api/events", events),
        Route("/files/{name}", files),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(TokenMiddleware, token=token)] if token else []
    return Starlette(routes=routes, middleware=middleware)


def _model_zip(folder: Path) -> Response:
    if not folder.is_dir():
        return PlainTextResponse("404: this run has not exported a model yet", status_code=404)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, Path("model") / path.relative_to(folder))
    return Response(buf.getvalue(), media_type="application/zip",
                    headers={"Content-Disposition": 'attachment; filename="model.zip"'})


def check_bind(host: str, token: str | None) -> None:
    """Binding beyond this machine needs a token (the page shows per-site results)."""
    if host not in LOOPBACK and not token:
        raise ValueError(f"--host {host} makes the dashboard reachable from other machines: "
                         "pass --token T (and share the URL with ?token=T only with your team)")


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8765,
          token: str | None = None) -> None:
    """Run the dashboard with uvicorn until interrupted."""
    import uvicorn

    check_bind(host, token)
    app = create_app(run_dir, token)
    uvicorn.run(app, host=host, port=port, log_level="warning")
