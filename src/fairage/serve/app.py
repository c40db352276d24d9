"""The HTTP service: a FastAPI app around one loaded age predictor and its model card.

Endpoints::

    GET  /health     {"status": "ok"}
    POST /predict    multipart field ``file`` or a raw image body ->
                     {"faces": [{"box": [x, y, w, h], "score", "age"[, "spread"][, "age_lo", "age_hi"]}],
                      "image": {"width", "height"}, "model", "interval_level"}; "spread" (years, the std of the
                     predicted age distribution) for dex/coral/corn heads; age_lo-age_hi: the conformal interval
                     at interval_level, for a calibrated model; interval_level is null otherwise
    GET  /model      the model card (JSON)
    GET  /model.md   the model card (Markdown)
    GET  /           a self-contained web page: drop a photo, see the ages, read the card

The model is loaded once, when the app is made. Each received upload is decoded, searched for
faces and cropped in one of ``prepare_processes`` worker processes (``fairage.serve.prepare``;
started with the app's lifespan, stopped at its shutdown), or with ``prepare_processes=0`` on
one of ``prepare_threads`` threads of this process; the crops then join a queue
(``fairage.serve.batching.CropBatcher``) whose thread runs the age model on the crops of
several requests in one forward pass: up to ``max_batch`` faces, gathered for at most
``batch_wait_ms`` after the first (``max_batch=1``: every request's crops alone). The event loop
keeps answering meanwhile. A predictor with only ``predict_image`` (no ``prepare_image``) runs
each request whole on one thread. Two bounded counts, so slow clients cannot starve the others: at most ``max_uploading``
request bodies are being received at once and at most ``max_pending`` received uploads wait
for (or are in) inference; more get 503. A body must arrive within ``body_timeout`` seconds
(plus one per ``min_body_rate`` bytes received), with no gap longer than ``chunk_timeout``
(408 and the connection closed otherwise), and the
request headers within ``HEADER_TIMEOUT`` (``serve_protocol``: the connection is closed).
Bad uploads get 400, 413 or 415 with a message; the request body is read with a running
byte count, so an oversized upload is refused without being stored.
"""

from __future__ import annotations

import asyncio
import math
import os
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from ..errors import ConfigError, DataError
from .batching import CropBatcher
from .uploads import MAX_PIXELS, MAX_UPLOAD_BYTES, UploadError, check_image

#: seconds a connection may take to send a request's headers (``serve_protocol``)
HEADER_TIMEOUT = 10.0

#: room for the multipart boundaries and part headers around the file
_MULTIPART_OVERHEAD = 64 * 1024
#: after refusing an oversized body, read (and drop) up to this much more of it so the client
#: gets the 413 instead of a connection reset; beyond it the connection is simply closed
_DRAIN_LIMIT = 64 * 1024 * 1024
_RAW_TYPES = ("application/octet-stream", "")


@dataclass(frozen=True)
class ServeLimits:
    """Limits on what one request may ask of the service."""

    #: encoded image bytes per upload (413 above)
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    #: decoded pixels (width x height) per image (413 above)
    max_pixels: int = MAX_PIXELS
    #: received uploads waiting for or in inference at once (503 above)
    max_pending: int = 64
    #: request bodies being received at once (503 above), counted apart from the inference queue
    max_uploading: int = 128
    #: seconds to receive a request body (408 above), plus one second per ``min_body_rate`` bytes
    #: received: a slow-loris client is cut after about this long, a real upload keeps its pace
    body_timeout: float = 10.0
    #: bytes per second a body must keep up to earn more time than ``body_timeout``
    min_body_rate: float = 50_000.0
    #: longest wait for the next piece of a request body, seconds (408 above)
    chunk_timeout: float = 5.0
    #: faces in one forward pass shared by concurrent requests (1: each request's faces alone)
    max_batch: int = 32
    #: milliseconds the first request of a batch waits for others' faces (0: only those already queued)
    batch_wait_ms: float = 5.0
    #: threads that decode, detect and crop uploads before the shared forward pass
    prepare_threads: int = 2
    #: worker processes that decode, detect and crop instead of those threads (0: the threads;
    #: ``fairage serve`` defaults to the usable CPUs, ``fairage.serve.prepare.usable_cpus``)
    prepare_processes: int = 0
    #: longer side (pixels) photos are downscaled to for detection in those processes (0: the
    #: detector's own, as ``fairage predict``; smaller is faster and misses more small faces)
    detect_side: int = 0

    def __post_init__(self) -> None:
        for key, low, high in _SETTING_BOUNDS:
            value = getattr(self, key)
            integral = key in _INTEGER_SETTINGS
            ok = (
                not isinstance(value, bool)
                and isinstance(value, (int, float))
                and (isinstance(value, int) if integral else math.isfinite(value))
                and low <= value <= high
            )
            if not ok:
                kind = "an integer" if integral else "a number"
                option = f" ({_CLI_OPTIONS[key]})" if key in _CLI_OPTIONS else ""
                raise ConfigError(
                    f"serve setting {key}{option} must be {kind} from {low:g} to {high:g}, got {str(value)[:40]!r}"
                )


#: (key, lowest, highest) of every ServeLimits field, checked when one is made
_SETTING_BOUNDS = (
    ("max_upload_bytes", 1, 2**40),
    ("max_pixels", 1, 2**40),
    ("max_pending", 1, 1_000_000),
    ("max_uploading", 1, 1_000_000),
    ("body_timeout", 0.001, 86_400.0),
    ("min_body_rate", 1.0, 1e12),
    ("chunk_timeout", 0.001, 86_400.0),
    ("max_batch", 1, 4096),
    ("batch_wait_ms", 0.0, 1000.0),
    ("prepare_threads", 1, 64),
    ("prepare_processes", 0, 64),
    ("detect_side", 0, 8192),
)
#: the `fairage serve` options that set a ServeLimits field (named in its messages)
_CLI_OPTIONS = {
    "max_upload_bytes": "--max-upload-mb",
    "max_pixels": "--max-pixels",
    "max_batch": "--max-batch",
    "batch_wait_ms": "--batch-wait-ms",
    "prepare_threads": "--prepare-threads",
    "prepare_processes": "--prepare-processes",
    "detect_side": "--detect-side",
}
_INTEGER_SETTINGS = {
    "max_upload_bytes",
    "max_pixels",
    "max_pending",
    "max_uploading",
    "max_batch",
    "prepare_threads",
    "prepare_processes",
    "detect_side",
}


def _predictor(model: Any, detector: str, detector_threads: int = 1):
    from ..inference.predictor import AgePredictor

    if hasattr(model, "predict_image"):
        return model
    return AgePredictor(model, detector=detector, detector_threads=detector_threads)


def _prepare_pool(predictor, limits: ServeLimits):
    """The worker processes that prepare uploads (``fairage.serve.prepare``), or None: none asked
    for, or a predictor that does not say how it detects (``detector_name``, ``detector_threads``,
    ``image_size``: ``AgePredictor``'s), whose uploads are prepared on its own threads."""
    if limits.detect_side and limits.prepare_processes == 0:
        raise ConfigError(
            "serve setting detect_side (--detect-side) applies to the prepare processes; "
            "set prepare_processes (--prepare-processes) to 1 or more"
        )
    if limits.prepare_processes == 0 or not all(
        hasattr(predictor, a) for a in ("detector_name", "detector_threads", "image_size")
    ):
        return None
    from .prepare import PreparePool, PrepareSpec

    spec = PrepareSpec(
        predictor.detector_name,
        int(predictor.detector_threads),
        int(predictor.image_size),
        limits.max_pixels,
        limits.detect_side,
    )
    return PreparePool(spec, limits.prepare_processes)


def default_card(loaded) -> dict:
    """The model card of a loaded model: from its run or model folder when it has one."""
    from ..outputs.modelcard import build_model_card

    folder = loaded.run_dir if getattr(loaded, "run_dir", None) else loaded.source
    return build_model_card(folder)


def create_app(
    predictor_or_model_path: Any,
    *,
    card: dict | None = None,
    limits: ServeLimits | None = None,
    detector: str = "auto",
    detector_threads: int = 1,
    runtime: str | None = None,
    model_threads: int = 1,
) -> FastAPI:
    """The FastAPI app serving one model.

    ``predictor_or_model_path``: a ``fairage.inference.predictor.AgePredictor`` (anything with
    ``predict_image`` and a ``loaded`` LoadedModel; with ``prepare_image``, ``finish_image`` and
    ``predict_crops_spread`` too, its requests share forward passes), a LoadedModel, or a model
    path (run folder, model folder, exported model) loaded here with ``detector`` and
    ``detector_threads`` (``AgePredictor``). ``card``: the model card dict (default:
    ``fairage.outputs.modelcard.build_model_card`` of the model's folder). ``limits``: ``ServeLimits``.
    ``runtime``: ``torch``, ``onnxruntime`` (``model_threads`` intra-op threads) or ``auto`` (the
    faster here, ``AgePredictor.use_runtime``) for the age model; None leaves the predictor's.
    With ``limits.prepare_processes`` > 0 and a predictor that names its detector
    (``detector_name``, ``detector_threads``, ``image_size``), uploads are prepared in that many
    worker processes (``app.state.prepare_pool``), started by the app's lifespan and stopped at
    its shutdown (run it under uvicorn, or ``with TestClient(app)``).
    """
    from ..outputs.modelcard import card_markdown

    predictor = _predictor(predictor_or_model_path, detector, detector_threads)
    if runtime is not None and hasattr(predictor, "use_runtime"):
        predictor.use_runtime(runtime, model_threads)
    card = card if card is not None else default_card(predictor.loaded)
    card_md = card_markdown(card)
    service = _Service(predictor, limits or ServeLimits())
    page = resources.files("fairage.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await service.start()
            yield
        finally:
            service.close()

    app = FastAPI(
        title="fairage",
        version=_version(),
        lifespan=lifespan,
        description="Apparent-age estimation with a measured model card (error by group, with intervals).",
    )
    app.state.predictor = predictor
    app.state.limits = service.limits
    app.state.batcher = service.batcher
    app.state.prepare_pool = service.pool
    _add_routes(app, service, card, card_md, page)
    return app


def _add_routes(app: FastAPI, service: _Service, card: dict, card_md: str, page: str) -> None:
    """The service's endpoints: /health, POST /predict, /model (card), /model.md, / (the page)."""

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, err: UploadError):
        # a body that stopped arriving is left unread: the connection cannot carry another request
        headers = {"Connection": "close"} if err.status == 408 else None
        return JSONResponse({"detail": str(err)}, status_code=err.status, headers=headers)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/predict", openapi_extra=_PREDICT_OPENAPI)
    async def predict(request: Request, faces_only: bool = False) -> JSONResponse:
        return await service.predict(request, faces_only)

    @app.get("/model")
    async def model_card() -> dict:
        return card

    @app.get("/model.md", response_class=PlainTextResponse)
    async def model_card_markdown() -> PlainTextResponse:
        return PlainTextResponse(card_md, media_type="text/markdown; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)


class _Service:
    """What the app's requests share: the predictor, the limits, the inference threads, the batcher of
    crops from concurrent requests and the prepare processes, and the counts of requests in flight."""

    def __init__(self, predictor, limits: ServeLimits):
        self.predictor, self.limits = predictor, limits
        self.model_name = predictor.loaded.name
        calibration = getattr(predictor.loaded, "calibration", None)
        self.interval_level = float(calibration.level) if calibration is not None else None
        batched = all(hasattr(predictor, a) for a in ("prepare_image", "finish_image", "predict_crops_spread"))
        self.executor = ThreadPoolExecutor(
            max_workers=limits.prepare_threads if batched else 1, thread_name_prefix="fairage-inference"
        )
        self.batcher = (
            CropBatcher(predictor.predict_crops_spread, limits.max_batch, limits.batch_wait_ms / 1000.0)
            if batched
            else None
        )
        self.pool = _prepare_pool(predictor, limits) if batched else None
        self.pending = 0
        self.uploading = 0

    async def start(self) -> None:
        """The service is up once its prepare workers are: the first requests wait for none."""
        if self.pool is not None:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in self.pool.start()))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.batcher is not None:
            self.batcher.close()

    async def predict(self, request: Request, faces_only: bool) -> JSONResponse:
        """POST /predict: receive the upload (503 when too many are arriving or waiting), then its faces and ages."""
        limits = self.limits
        if self.uploading >= limits.max_uploading:
            await _drain(request, 0, limits)
            return JSONResponse(
                {"detail": f"busy: {self.uploading} uploads are being received; try again shortly"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        self.uploading += 1  # counted from the first byte read, so memory is bounded too
        try:
            data = await read_upload(request, limits)
        finally:
            self.uploading -= 1
        # only uploads received in full wait for the model: a slow sender holds no place in its queue
        if self.pending >= limits.max_pending:
            return JSONResponse(
                {"detail": f"busy: {self.pending} uploads are waiting; try again shortly"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        self.pending += 1
        try:
            if self.batcher is not None:
                return JSONResponse(await self.infer_batched(data, faces_only))
            loop = asyncio.get_running_loop()
            return JSONResponse(await loop.run_in_executor(self.executor, self.infer, data, faces_only))
        finally:
            self.pending -= 1

    def infer(self, data: bytes, faces_only: bool) -> dict:
        """A whole request on one thread (a predictor without ``prepare_image``)."""
        check_image(data, self.limits.max_pixels)
        try:
            result = self.predictor.predict_image(data, faces_only=faces_only)
        except DataError as err:  # passed the header check but the pixel data is bad
            raise UploadError(400, f"upload: {err}") from None
        return self.answer(result)

    def prepare(self, data: bytes, faces_only: bool):
        check_image(data, self.limits.max_pixels)
        try:
            # the bytes, as `fairage predict` reads a file and the training cache a face crop: one
            # decoder (fairage.data.decode), EXIF turn, crops; a face's box is the upload's size
            return self.predictor.prepare_image(data, faces_only=faces_only)
        except DataError as err:  # passed the header check but the pixel data is bad
            raise UploadError(400, f"upload: {err}") from None

    async def prepare_in_process(self, data: bytes, faces_only: bool):
        from ..inference.predictor import PreparedImage

        try:
            width, height, found, crops = await asyncio.wrap_future(self.pool.submit(data, faces_only))
        except BrokenProcessPool:  # the next request gets a new pool
            raise HTTPException(500, "a prepare worker process stopped while reading this upload") from None
        return PreparedImage(width, height, found, crops)

    async def infer_batched(self, data: bytes, faces_only: bool) -> dict:
        if self.pool is not None:
            prepared = await self.prepare_in_process(data, faces_only)
        else:
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(self.executor, self.prepare, data, faces_only)
        if len(prepared.crops) == 0:
            return self.answer(self.predictor.finish_image(prepared, np.empty(0), None))
        ages, spreads = await asyncio.wrap_future(self.batcher.submit(prepared.crops))
        return self.answer(self.predictor.finish_image(prepared, ages, spreads))

    def answer(self, result) -> dict:
        """The JSON answer: each face's box (pixels), score, age and spread/interval (years), the image size."""
        return {
            "faces": [
                {
                    "box": [int(v) for v in f.box],
                    "score": float(f.score),
                    "age": float(f.age),
                    **({} if getattr(f, "spread", None) is None else {"spread": float(f.spread)}),
                    **({"age_lo": float(f.age_lo), "age_hi": float(f.age_hi)} if f.age_lo is not None else {}),
                }
                for f in result.faces
            ],
            "image": {"width": int(result.width), "height": int(result.height)},
            "model": self.model_name,
            "interval_level": self.interval_level,
        }


async def _body_chunks(request: Request, limits: ServeLimits):
    """The request body's pieces as they arrive, within ``limits.body_timeout`` seconds (plus one
    per ``limits.min_body_rate`` bytes received) in all and ``limits.chunk_timeout`` between
    pieces; UploadError 408 when the client is slower.

    Read from the ASGI ``receive`` directly, so a timed-out wait is simply cancelled.
    ClientDisconnect when the client goes away.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.body_timeout
    received = 0
    while True:
        remaining = min(limits.chunk_timeout, deadline + received / limits.min_body_rate - loop.time())
        try:
            if remaining <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(request.receive(), remaining)
        except TimeoutError:
            raise UploadError(
                408,
                f"the upload arrived too slowly ({received} bytes; the service waits "
                f"{limits.chunk_timeout:g} s for each part and {limits.body_timeout:g} s "
                f"for the body, plus 1 s per {limits.min_body_rate:g} bytes)",
            ) from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        received += len(chunk)
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _drain(request: Request, already: int, limits: ServeLimits) -> None:
    """Read and drop the rest of a refused body (bounded in bytes and time), so the client sees the answer."""
    seen = already
    try:
        async for chunk in _body_chunks(request, limits):
            seen += len(chunk)
            if seen > _DRAIN_LIMIT:
                return
    except (ClientDisconnect, UploadError):  # gone, or too slow: nothing more to drain
        return


async def read_upload(request: Request, limits: ServeLimits) -> bytes:
    """The encoded image of a ``/predict`` request: the multipart field ``file`` or the raw body.

    Raises UploadError: 413 over ``limits.max_upload_bytes``, 415 a body type that is not an
    image, 400 a multipart form without ``file`` or a malformed one, 408 a body slower than
    ``limits.body_timeout`` / ``limits.chunk_timeout``.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = content_type == "multipart/form-data"
    if not multipart and not (content_type.startswith("image/") or content_type in _RAW_TYPES):
        raise UploadError(
            415,
            f"unsupported content type {content_type!r}: send the photo as multipart field "
            "'file' or as a raw image body (image/* or application/octet-stream)",
        )
    max_body = limits.max_upload_bytes + (_MULTIPART_OVERHEAD if multipart else 0)
    too_large = UploadError(413, f"upload larger than the limit of {limits.max_upload_bytes} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        await _drain(request, 0, limits)
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in _body_chunks(request, limits):
            size += len(chunk)
            if size > max_body:
                await _drain(request, size, limits)
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise UploadError(400, f"the client disconnected after {size} bytes of the upload") from None
    body = b"".join(chunks)
    if not multipart:
        return body

    async def replay():
        yield body

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=1, max_fields=16).parse()
    except MultiPartException as err:
        raise UploadError(400, f"malformed multipart form: {err.message}") from None
    field = form.get("file")
    try:
        if not isinstance(field, UploadFile):
            raise UploadError(400, "multipart form without a file field named 'file'")
        data = await field.read()
    finally:
        await form.close()
    if len(data) > limits.max_upload_bytes:
        raise too_large
    return data


def _version() -> str:
    from .. import __version__

    return __version__


_PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


def serve_protocol(header_timeout: float = HEADER_TIMEOUT) -> type:
    """uvicorn's h11 protocol with a bound on the time to send request headers (``uvicorn.Config(http=...)``).

    uvicorn closes an idle keep-alive connection but waits for ever for a request whose headers
    trickle in; this protocol closes a connection that has not sent a request's headers
    ``header_timeout`` seconds after it opened (or after its previous response).
    """
    if header_timeout == HEADER_TIMEOUT:
        return HeaderTimeoutH11Protocol
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout": float(header_timeout)})


def _h11_protocol_base() -> type:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


class HeaderTimeoutH11Protocol(_h11_protocol_base()):
    """``serve_protocol``'s class: uvicorn's ``H11Protocol`` plus a request-header deadline."""

    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _waiting_for_headers(self) -> bool:
        import h11

        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if not self._waiting_for_headers():  # a request's headers are in
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._waiting_for_headers():
            self._arm_header_timer()  # the next request's headers get the same time

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``fairage serve`` starts a service with, one object: the model, its limits, the face
    detector and the age model's runtime and threads (``create_app``'s arguments)."""

    model: Path
    limits: ServeLimits = ServeLimits()
    detector: str = "auto"
    detector_threads: int = 1
    runtime: str | None = "auto"
    model_threads: int = 1

    def create_app(self) -> FastAPI:
        """The app of these settings, in a process that is the service's own: its forward passes use
        ``model_threads`` threads (torch's default, every core, waits for busy cores at every layer on a
        shared machine). The model and its card load here, so a bad path fails before serving."""
        import torch

        torch.set_num_threads(self.model_threads)
        return create_app(
            self.model,
            limits=self.limits,
            detector=self.detector,
            detector_threads=self.detector_threads,
            runtime=self.runtime,
            model_threads=self.model_threads,
        )

    def to_environment(self) -> dict[str, str]:
        """These settings as ``FAIRAGE_SERVE_*`` variables, for worker processes (``app_from_environment``)."""
        env = {
            "FAIRAGE_SERVE_MODEL": str(Path(self.model).resolve()),
            "FAIRAGE_SERVE_DETECTOR": self.detector,
            "FAIRAGE_SERVE_DETECTOR_THREADS": str(self.detector_threads),
            "FAIRAGE_SERVE_MODEL_THREADS": str(self.model_threads),
            **limits_to_environment(self.limits),
        }
        if self.runtime is not None:
            env["FAIRAGE_SERVE_RUNTIME"] = self.runtime
        return env

    @classmethod
    def from_environment(cls) -> ServeSettings:
        """The settings ``to_environment`` wrote (defaults for variables not set)."""
        return cls(
            Path(os.environ["FAIRAGE_SERVE_MODEL"]),
            limits=limits_from_environment(),
            detector=os.environ.get("FAIRAGE_SERVE_DETECTOR", "auto"),
            detector_threads=int(os.environ.get("FAIRAGE_SERVE_DETECTOR_THREADS", "1")),
            runtime=os.environ.get("FAIRAGE_SERVE_RUNTIME"),
            model_threads=int(os.environ.get("FAIRAGE_SERVE_MODEL_THREADS", "1")),
        )


def app_from_environment() -> FastAPI:
    """App factory for ``uvicorn --factory`` with several worker processes (``fairage serve --workers N``):
    the app of ``ServeSettings.from_environment()``."""
    return ServeSettings.from_environment().create_app()


def run_service(
    settings: ServeSettings,
    application: FastAPI | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    log_level: str = "info",
) -> None:
    """Serve under uvicorn until stopped: ``application`` (``settings.create_app()``, built here when None)
    in this process with one worker; with several (``application`` unused: pass None), each worker process builds its own app from ``settings`` (handed over as
    ``FAIRAGE_SERVE_*`` environment variables, the one channel uvicorn's workers inherit)."""
    import uvicorn

    if workers == 1:
        uvicorn.run(
            application or settings.create_app(), host=host, port=port, log_level=log_level, http=serve_protocol()
        )
        return
    os.environ.update(settings.to_environment())
    uvicorn.run(
        "fairage.serve.app:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        http=serve_protocol(),
    )


#: the ServeLimits fields ``fairage serve --workers N`` passes to its worker processes
ENVIRONMENT_SETTINGS = (
    "max_upload_bytes",
    "max_pixels",
    "max_batch",
    "batch_wait_ms",
    "prepare_threads",
    "prepare_processes",
    "detect_side",
)


def limits_to_environment(limits: ServeLimits) -> dict[str, str]:
    """``FAIRAGE_SERVE_<FIELD>`` variables of ``limits`` (``ENVIRONMENT_SETTINGS``)."""
    return {f"FAIRAGE_SERVE_{key.upper()}": repr(getattr(limits, key)) for key in ENVIRONMENT_SETTINGS}


def limits_from_environment() -> ServeLimits:
    """The ServeLimits that ``limits_to_environment`` wrote (defaults for variables not set)."""
    values: dict[str, Any] = {}
    for key in ENVIRONMENT_SETTINGS:
        text = os.environ.get(f"FAIRAGE_SERVE_{key.upper()}")
        if text is not None:
            try:
                values[key] = int(text) if key in _INTEGER_SETTINGS else float(text)
            except ValueError:
                raise ConfigError(f"FAIRAGE_SERVE_{key.upper()}={text[:40]!r} is not a number") from None
    return ServeLimits(**values)
