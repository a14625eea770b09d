"""The FastAPI app: JSON API + the static page, one model loaded once.

Endpoints
---------
* ``POST /predict``   multipart ``file`` -> top-k labels, calibrated probabilities, latency; ``label: null`` and
  ``unsure: true`` (the top-k still there) when the top-1 probability is below ``serve.abstain_below``
* ``GET  /model``     architecture, classes, test metrics, data version, params summary, the abstain threshold
  and the model's temperature, ...
* ``GET  /model/confusion_matrix.png``
* ``GET  /healthz``   liveness + the loaded model
* ``GET  /``          the web page (``static/``); ``/docs`` and ``/openapi.json`` from FastAPI

Safety
------
* connections: idle and slow-header timeouts, a cap on requests *in progress* (503 beyond it,
  ``/healthz`` exempt) and refusal of ambiguous framing (Transfer-Encoding with
  Content-Length: 400), all in :mod:`cvpipe.serve.guards` (:class:`BackgroundServer` and the
  CLI run uvicorn with :func:`~cvpipe.serve.guards.uvicorn_options`);
* uploads above ``serve.max_upload_bytes`` get 413 from :class:`LimitsMiddleware`
  before the body is read (Content-Length) or as soon as it grows past the limit
  (chunked bodies);
* every request gets ``serve.request_timeout_s``: a slow upload gets 408, slow
  work (queue + inference) gets 504; the server keeps serving;
* bad images are refused by :func:`cvpipe.data.images.decode_image` with 4xx JSON
  ``{"error": <reason code>, "detail": <why>}``, and whatever else the decoder raises on a
  malformed file is a 422 ``corrupt`` too (:meth:`ServedModel.decoder_errors`); an unexpected
  error elsewhere is still a JSON 500, never a dropped connection;
* memory per request is bounded: images above ``serve.large_image_pixels`` are decoded one at a
  time (:meth:`ServedModel.decode_slot`, taken before a compute slot, so small requests keep
  flowing) and their memory is handed back to the system;
* decoding and inference run in a worker thread (``serve.inference_threads`` at
  once), never on the event loop, so ``/healthz`` answers while a model runs; with
  ``serve.batch_window_ms`` > 0 the inference of requests arriving within the window runs as one
  batch (:mod:`cvpipe.serve.batching`) while decoding stays in the request's thread.

The model runs on ONNX Runtime or torch (:mod:`cvpipe.serve.model`); ``/healthz`` and ``/model``
say which.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from importlib import resources
from typing import Any, AsyncIterator, Optional

import anyio
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from cvpipe import __version__
from cvpipe.core.config import ServeParams
from cvpipe.data.images import BOMB, EMPTY, LFS_POINTER, NOT_IMAGE, ImageRejected
from cvpipe.serve.abstain import abstain_summary, is_unsure
from cvpipe.serve.batching import MicroBatcher
from cvpipe.serve.guards import ActiveRequestLimit, FramingGuard, ServeLimits, uvicorn_options
from cvpipe.serve.model import Prediction, ServedModel
from cvpipe.serve.review import ReviewStore, review_router

log = logging.getLogger("cvpipe.serve")

# image rejection reason -> HTTP status
REASON_STATUS = {NOT_IMAGE: 415, LFS_POINTER: 415, EMPTY: 400, BOMB: 413}
MULTIPART_SLACK = 64 * 1024  # boundary + part headers on top of the file itself


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


class _BodyTooLarge(Exception):
    pass


class LimitsMiddleware:
    """Pure ASGI middleware: body size cap and a per-request deadline."""

    def __init__(self, app, max_body: int, timeout_s: float):
        self.app, self.max_body, self.timeout_s = app, max_body, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _error(400, "bad_request", "invalid Content-Length header")(scope, receive, send)
            if declared > self.max_body:
                return await _error(
                    413, "too_large", f"upload is {declared} bytes; the limit is {self.max_body - MULTIPART_SLACK} bytes"
                )(scope, receive, send)

        started = False
        received = 0
        body_done = scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE")
        over_limit = False

        async def limited_receive():
            nonlocal received, body_done, over_limit
            msg = await receive()
            if msg["type"] == "http.request":
                body_done = body_done or not msg.get("more_body", False)
                received += len(msg.get("body", b""))
                if received > self.max_body:
                    over_limit = True
                    raise _BodyTooLarge()
            return msg

        async def tracking_send(msg):
            nonlocal started
            if over_limit:
                return  # whatever the app made of the cut-off body (FastAPI: 400), the answer is 413
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            with anyio.fail_after(self.timeout_s):
                await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            pass
        except TimeoutError:
            if not started:
                if not body_done:
                    resp = _error(408, "request_timeout", f"the upload did not complete within {self.timeout_s:g} s")
                else:
                    resp = _error(504, "timeout", f"the request did not complete within {self.timeout_s:g} s")
                await resp(scope, receive, send)
            return
        if over_limit and not started:
            await _error(413, "too_large", f"upload exceeds the limit of {self.max_body - MULTIPART_SLACK} bytes")(
                scope, receive, send)


class TopK(BaseModel):
    label: str
    index: int
    probability: float


class PredictResponse(BaseModel):
    label: Optional[str] = Field(description="the predicted class; null when the model is unsure (see `unsure`)")
    unsure: bool = Field(
        False, description="true when the calibrated top-1 probability is below `abstain_below`: no label is given, "
        "`top_k` still lists the candidates")
    probability: float = Field(description="the calibrated top-1 probability (also when unsure)")
    abstain_below: float = Field(0.0, description="the server's threshold (serve.abstain_below); 0 = never unsure")
    top_k: list[TopK]
    latency_ms: dict[str, float]
    image: dict[str, Any]
    model: str
    filename: Optional[str] = None


class ErrorResponse(BaseModel):
    error: str
    detail: str


ERRORS = {s: {"model": ErrorResponse} for s in (400, 408, 413, 415, 422, 504)}


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """On shutdown, stop the micro-batcher's worker thread (after uvicorn has finished the requests in flight)."""
    yield
    batcher: Optional[MicroBatcher] = getattr(app.state, "batcher", None)
    if batcher is not None:
        await anyio.to_thread.run_sync(batcher.close)


def create_app(model: ServedModel, settings: ServeParams, limits: Optional[ServeLimits] = None,
               review: Optional[ReviewStore] = None) -> FastAPI:
    """The app around *model*; *limits* (default :class:`ServeLimits`) sets the request cap, which the
    uvicorn options of the same limits complement with the connection-level ones. *review* mounts the
    label review page and API (:mod:`cvpipe.serve.review`)."""
    limits = limits or ServeLimits.from_params(settings)
    app = FastAPI(
        lifespan=_lifespan,
        title="cvpipe",
        version=__version__,
        summary="Image classification with the promoted cvpipe model.",
        description=f"Serving **{model.arch}** ({len(model.classes)} classes) from `{model.source}`.",
    )
    app.state.model = model
    app.state.settings = settings
    stats = {"requests": 0, "predictions": 0, "rejected": 0, "started": time.time()}
    _add_error_handlers(app)
    _add_model_routes(app, model, settings, stats)
    _add_predict_route(app, model, settings, stats)
    _add_page(app, settings)
    if review is not None:
        app.include_router(review_router(review))
    # the last added runs first: framing, then the request cap, then size and time limits
    app.add_middleware(LimitsMiddleware, max_body=settings.max_upload_bytes + MULTIPART_SLACK,
                       timeout_s=settings.request_timeout_s)
    app.add_middleware(ActiveRequestLimit, max_active=limits.max_active_requests, exempt=limits.exempt_paths)
    app.add_middleware(FramingGuard)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is JSON ``{"error", "detail"}``: ours, HTTP errors, invalid requests, and bugs (500)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.error, exc.detail)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        missing = [e for e in exc.errors() if e.get("type") == "missing"]
        if missing:
            where = ".".join(str(p) for p in missing[0].get("loc", ()))
            return _error(400, "missing_file", f"send the image as multipart/form-data field 'file' ({where} missing)")
        return _error(422, "invalid_request", "; ".join(str(e.get("msg")) for e in exc.errors()))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # pragma: no cover - a bug, still JSON
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")


def _add_model_routes(app: FastAPI, model: ServedModel, settings: ServeParams, stats: dict[str, Any]) -> None:
    """``/healthz``, ``/model`` and ``/model/confusion_matrix.png``."""
    abstain = abstain_summary(settings.abstain_below, model.temperature, model.risk_coverage)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, Any]:
        """Liveness: answers while inference runs (the event loop is never blocked)."""
        return {"status": "ok", "model": model.arch, "backend": model.backend.name, "classes": len(model.classes),
                "uptime_s": round(time.time() - stats["started"], 1), "predictions": stats["predictions"],
                "rejected": stats["rejected"]}

    @app.get("/model", tags=["model"])
    async def model_card() -> dict[str, Any]:
        """The model card: architecture, classes, test metrics, data version, params summary, leaderboard, and
        ``abstain``: the threshold below which /predict answers unsure, the model's temperature and the test
        coverage/error evaluate measured at that threshold."""
        return {**model.info(), "abstain": abstain}

    @app.get("/model/confusion_matrix.png", tags=["model"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorResponse}})
    async def confusion_matrix():
        """The confusion matrix image, held in memory since the model was loaded."""
        png = model.assets.get("confusion_matrix.png")
        if png is None:
            raise ApiError(404, "not_found", "this model has no confusion matrix image (run cvpipe evaluate / compare)")
        return Response(png, media_type="image/png")


def _add_predict_route(app: FastAPI, model: ServedModel, settings: ServeParams, stats: dict[str, Any]) -> None:
    """``POST /predict``: decoding and inference in a worker thread, within the request's deadline."""
    # Admission (anyio limiter) and compute (a thread semaphore) are separate: a request
    # that times out abandons its thread, which still holds the compute slot until the
    # model returns, so CPU use stays bounded; a queued one whose deadline has passed
    # never starts the model.
    limiter = anyio.CapacityLimiter(settings.inference_threads * 4)
    compute = threading.BoundedSemaphore(settings.inference_threads)
    batcher = None
    if settings.batch_window_ms > 0:  # decoding holds a compute slot; inference waits in the batcher, not in a slot
        batcher = MicroBatcher(model.backend.run, settings.batch_window_ms, settings.max_batch_size)
        app.state.batcher = batcher  # its worker thread idles on a queue; the app's shutdown (_lifespan) ends it

    @app.post("/predict", tags=["model"], response_model=PredictResponse, responses=ERRORS)
    async def predict(file: UploadFile = File(..., description="the image (JPEG, PNG, WebP, GIF, BMP, TIFF)"),
                      top_k: Optional[int] = None) -> PredictResponse:
        """Classify one uploaded image. The format is sniffed from the content; the file name and type are ignored."""
        t0 = time.perf_counter()
        stats["requests"] += 1
        k = settings.top_k if top_k is None else top_k
        if k < 1:
            raise ApiError(422, "invalid_request", "top_k must be >= 1")
        data = await _read_upload(file, settings.max_upload_bytes, stats)

        deadline = time.monotonic() + settings.request_timeout_s

        def work():
            # a large image waits for the one large-decode slot before it takes a compute slot
            with model.decode_slot(data, settings.max_pixels, settings.large_image_pixels), compute:
                if time.monotonic() > deadline:
                    return None  # the client already got its 504
                arr, pred = model.prepare(data, max_pixels=settings.max_pixels, min_size=settings.min_size,
                                          max_aspect_ratio=settings.max_aspect_ratio)
                if batcher is None:
                    return model.finish(pred, arr, k)
            try:
                return model.finish(pred, arr, k, lambda a: batcher.submit(a, deadline - time.monotonic()))
            except TimeoutError:
                return None

        t_queue = time.perf_counter()
        try:
            pred = await anyio.to_thread.run_sync(work, limiter=limiter, abandon_on_cancel=True)
        except ImageRejected as exc:
            stats["rejected"] += 1
            status = REASON_STATUS.get(exc.reason, 422)
            raise ApiError(status, exc.reason, _reason_text(exc)) from None
        if pred is None:
            raise ApiError(504, "timeout", f"the request did not complete within {settings.request_timeout_s:g} s")
        stats["predictions"] += 1
        return _predict_response(pred, model.arch, file.filename, t0, t_queue, settings.abstain_below)


async def _read_upload(file: UploadFile, max_bytes: int, stats: dict[str, Any]) -> bytes:
    """The uploaded file's bytes; 413 when it is larger than *max_bytes*."""
    data = await file.read(max_bytes + 1)
    await file.close()
    if len(data) > max_bytes:
        stats["rejected"] += 1
        raise ApiError(413, "too_large", f"the file exceeds the limit of {max_bytes} bytes")
    return data


def _predict_response(pred: Prediction, arch: str, filename: Optional[str], t0: float, t_queue: float,
                      abstain_below: float = 0.0) -> PredictResponse:
    """The /predict answer; the queue time is the time in the worker thread's queue (total minus work).

    Unsure (top-1 probability below *abstain_below*) is ``label: null`` + ``unsure: true`` rather than a
    ``"unsure"`` label: a class may be called "unsure", and a client that ignores the flag fails on the
    null instead of filing the image under a class. The decision uses the probability the answer shows."""
    total = (time.perf_counter() - t0) * 1e3
    worked = pred.decode_ms + pred.preprocess_ms + pred.inference_ms
    best = pred.top_k[0]
    unsure = is_unsure(best["probability"], abstain_below)
    return PredictResponse(
        label=None if unsure else best["label"], unsure=unsure, probability=best["probability"],
        abstain_below=abstain_below, top_k=pred.top_k,
        latency_ms={"decode": round(pred.decode_ms, 3), "preprocess": round(pred.preprocess_ms, 3),
                    "inference": round(pred.inference_ms, 3),
                    "queue": round(max(0.0, (time.perf_counter() - t_queue) * 1e3 - worked), 3),
                    "total": round(total, 3)},
        image=pred.image, model=arch, filename=filename,
    )


def _add_page(app: FastAPI, settings: ServeParams) -> None:
    """The web page: ``/``, its ``/config.json`` and ``/static``."""
    static = resources.files("cvpipe.serve") / "static"

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    @app.get("/config.json", include_in_schema=False)
    async def page_config() -> dict[str, Any]:
        return {"max_upload_bytes": settings.max_upload_bytes, "top_k": settings.top_k}

    app.mount("/static", StaticFiles(directory=str(static)), name="static")


_REASON_TEXT = {
    "empty_file": "the file is empty",
    "not_an_image": "this is not an image",
    "git_lfs_pointer": "this is a Git LFS pointer file, not the image it points to",
    "truncated": "the image is truncated (incomplete file)",
    "corrupt": "the image data is corrupt",
    "decompression_bomb": "the image declares too many pixels (possible decompression bomb)",
    "too_small": "the image is too small",
    "extreme_aspect_ratio": "the image is far too long and thin",
}


def _reason_text(exc: ImageRejected) -> str:
    head = _REASON_TEXT.get(exc.reason, exc.reason)
    return f"{head}: {exc.detail}" if exc.detail else head


class BackgroundServer:
    """Run an app under a real uvicorn server in a thread (tests, notebooks): ``with BackgroundServer(app) as url``.

    The server has the CLI's connection guards (:func:`~cvpipe.serve.guards.uvicorn_options` of *limits*);
    *config* overrides any ``uvicorn.Config`` keyword.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, limits: Optional[ServeLimits] = None,
                 **config: Any):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        options = {**uvicorn_options(limits), "log_level": "warning", **config}
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))
        self.thread = threading.Thread(target=self.server.run, name="cvpipe-serve", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
