"""`chexdist app`: one FastAPI process serving the shipped page (`static/`, nothing from a CDN) and
the JSON API over one loaded model.

- `GET /` the page, `GET /static/*` its script and style, `GET /healthz`, `GET /api/card`
- `POST /api/predict` (multipart `file`): the JSON of `chexdist predict --format json`
- `POST /api/cam` (multipart `file`, optional `finding`): Grad-CAM overlays as PNG data URLs

Errors are JSON `{"error": "..."}` with a 4xx code (400 bad form, 413 too large, 415 not an image,
422 unreadable or refused image, 503 busy); a server fault is a 500 with no traceback (it goes to the
server's log). Bodies over the cap are refused from their Content-Length before any byte is read.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at runtime

import logging
import os
import shutil
import signal
import sys
import tempfile
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from chexdist.app.uploads import UploadError, check_upload, declared_length, private_folder, receive_upload, too_large

LOG = logging.getLogger("chexdist.app")
STATIC = files("chexdist.app") / "static"
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; object-src 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class BodyLimit:
    """ASGI middleware: 413 from the Content-Length header alone, before the app reads the body;
    it adds the security headers to every response."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        length = declared_length(headers)
        if length is not None and length > self.limit:
            from starlette.responses import JSONResponse

            response = JSONResponse({"error": str(too_large(self.limit))}, status_code=413, headers={"connection": "close"})
            return await response(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(run: str | os.PathLike, *, max_upload_mb: float = 50, workers: int = 1, queue: int = 64,
               max_pixels: int | None = None):
    """The FastAPI app over `run` (its model loads here, once)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from PIL import Image
    from starlette.exceptions import HTTPException

    from chexdist.app.service import ModelService
    from chexdist.errors import ChexdistError

    limit = int(max_upload_mb * 2**20)
    pixels = int(max_pixels or Image.MAX_IMAGE_PIXELS)
    service = ModelService(run, workers=workers, queue=queue)
    root = Path(tempfile.mkdtemp(prefix="chexdist-app-"))

    @asynccontextmanager
    async def lifespan(_app):
        try:
            yield
        finally:
            service.close()
            shutil.rmtree(root, ignore_errors=True)

    app = FastAPI(title="chexdist", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.upload_root = service, root
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.exception_handler(UploadError)
    async def upload_error(_request, exc: UploadError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(ChexdistError)
    async def chexdist_error(_request, exc: ChexdistError):
        return JSONResponse({"error": str(exc)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, _exc):
        return JSONResponse({"error": "invalid request"}, status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_request, exc: Exception):
        LOG.error("request failed", exc_info=exc)
        return JSONResponse({"error": "internal server error (details are in the server's log)"}, status_code=500)

    @app.get("/")
    async def index():
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "arch": service.card["arch"], "workers": service.workers, "model_hooks": service.hook_count()}

    @app.get("/api/card")
    async def card():
        return service.card

    @app.post("/api/predict")
    async def predict(request: Request):
        with private_folder(root) as folder:
            upload = await receive_upload(request, folder, limit)
            check_upload(upload.path, pixels)
            return await service.submit(service.predict, upload.path, upload.name)

    @app.post("/api/cam")
    async def cam(request: Request):
        with private_folder(root) as folder:
            upload = await receive_upload(request, folder, limit)
            check_upload(upload.path, pixels)
            out = folder / "cam"
            out.mkdir()
            finding = upload.fields.get("finding") or None
            return await service.submit(service.cam, upload.path, upload.name, out, finding)

    return BodyLimit(app, limit)


def serve(run: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 50,
          workers: int = 1, queue: int = 64, access_log: bool = True) -> int:
    """Run the app with uvicorn until Ctrl-C or SIGTERM (uvicorn drains requests, then the pool
    stops and the private upload folder is removed)."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"chexdist: warning: listening on {host}: anyone who can reach this machine can use the app "
              "(there is no authentication); the default 127.0.0.1 keeps it to this machine", file=sys.stderr)
    app = create_app(run, max_upload_mb=max_upload_mb, workers=workers, queue=queue)
    print(f"chexdist app: http://{'[' + host + ']' if ':' in host else host}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="info" if access_log else "warning",
                            access_log=access_log, lifespan="on", timeout_graceful_shutdown=10)
    previous = signal.signal(signal.SIGTERM, _stopped)  # uvicorn re-raises the signal it drained on
    try:
        uvicorn.Server(config).run()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _stopped(_signum, _frame):
    """SIGTERM after uvicorn's graceful shutdown: a normal stop, exit code 0."""
    raise SystemExit(0)
