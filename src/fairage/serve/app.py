"""The HTTP service: a FastAPI app around one loaded age predictor and its model card.

Endpoints::

    GET  /health     {"status": "ok"}
    POST /predict    multipart field ``file`` or a raw image body ->
                     {"faces": [{"box": [x, y, w, h], "score", "age"[, "age_lo", "age_hi"]}],
                      "image": {"width", "height"}, "model", "interval_level"}
                     (age_lo-age_hi: the conformal interval at interval_level, for a calibrated
                     model; interval_level is null otherwise)
    GET  /model      the model card (JSON)
    GET  /model.md   the model card (Markdown)
    GET  /           a self-contained web page: drop a photo, see the ages, read the card

The model is loaded once, when the app is made. Inference runs on one dedicated thread
(torch uses the cores inside each call), so the event loop keeps answering while it works;
at most ``max_pending`` uploads are being read or wait for it at once, more get 503. Bad
uploads get 400, 413 or 415 with a message; the request body is read with a running byte
count, so an oversized upload is refused without being stored.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from ..errors import DataError
from .uploads import MAX_PIXELS, MAX_UPLOAD_BYTES, UploadError, check_image

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
    #: uploads being read, waiting for or in inference at once (503 above)
    max_pending: int = 64


def _predictor(model: Any, detector: str):
    from ..predict import AgePredictor

    return model if hasattr(model, "predict_image") else AgePredictor(model, detector=detector)


def default_card(loaded) -> dict:
    """The model card of a loaded model: from its run or model folder when it has one."""
    from ..modelcard import build_model_card

    folder = loaded.run_dir if getattr(loaded, "run_dir", None) else loaded.source
    return build_model_card(folder)


def create_app(predictor_or_model_path: Any, *, card: dict | None = None, limits: ServeLimits | None = None,
               detector: str = "auto") -> FastAPI:
    """The FastAPI app serving one model.

    ``predictor_or_model_path``: a ``fairage.predict.AgePredictor`` (anything with
    ``predict_image`` and a ``loaded`` LoadedModel), a LoadedModel, or a model path (run
    folder, model folder, exported model) loaded here with ``detector``. ``card``: the
    model card dict (default: ``fairage.modelcard.build_model_card`` of the model's folder).
    """
    from ..modelcard import card_markdown
    from ..predict import read_image

    predictor = _predictor(predictor_or_model_path, detector)
    card = card if card is not None else default_card(predictor.loaded)
    card_md = card_markdown(card)
    limits = limits or ServeLimits()
    page = resources.files("fairage.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    model_name = predictor.loaded.name
    calibration = getattr(predictor.loaded, "calibration", None)
    interval_level = float(calibration.level) if calibration is not None else None
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fairage-inference")
    pending = 0

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="fairage", version=_version(), lifespan=lifespan,
                  description="Apparent-age estimation with a measured model card (error by group, with intervals).")
    app.state.predictor = predictor
    app.state.limits = limits

    def infer(data: bytes, faces_only: bool) -> dict:
        check_image(data, limits.max_pixels)
        try:
            # the bytes, as `fairage predict` reads a file: same decoding, EXIF turn, crops; a face
            # crop is decoded first so its box and size are the upload's, not the model's input size
            result = predictor.predict_image(read_image(data) if faces_only else data, faces_only=faces_only)
        except DataError as err:  # passed the header check but the pixel data is bad
            raise UploadError(400, f"upload: {err}") from None
        return {
            "faces": [{"box": [int(v) for v in f.box], "score": float(f.score), "age": float(f.age),
                       **({"age_lo": float(f.age_lo), "age_hi": float(f.age_hi)} if f.age_lo is not None else {})}
                      for f in result.faces],
            "image": {"width": int(result.width), "height": int(result.height)},
            "model": model_name,
            "interval_level": interval_level,
        }

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, err: UploadError):
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/predict", openapi_extra=_PREDICT_OPENAPI)
    async def predict(request: Request, faces_only: bool = False) -> JSONResponse:
        nonlocal pending
        if pending >= limits.max_pending:
            await _drain(request, 0)
            return JSONResponse({"detail": f"busy: {pending} uploads are waiting; try again shortly"},
                                status_code=503, headers={"Retry-After": "1"})
        pending += 1  # counted from the first byte read, so memory is bounded too
        try:
            data = await read_upload(request, limits)
            loop = asyncio.get_running_loop()
            return JSONResponse(await loop.run_in_executor(executor, infer, data, faces_only))
        finally:
            pending -= 1

    @app.get("/model")
    async def model_card() -> dict:
        return card

    @app.get("/model.md", response_class=PlainTextResponse)
    async def model_card_markdown() -> PlainTextResponse:
        return PlainTextResponse(card_md, media_type="text/markdown; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


async def _drain(request: Request, already: int) -> None:
    """Read and drop the rest of a refused body (bounded), so the client sees the answer."""
    seen = already
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > _DRAIN_LIMIT:
                return
    except ClientDisconnect:  # the client went away: nothing left to drain
        return


async def read_upload(request: Request, limits: ServeLimits) -> bytes:
    """The encoded image of a ``/predict`` request: the multipart field ``file`` or the raw body.

    Raises UploadError: 413 over ``limits.max_upload_bytes``, 415 a body type that is not an
    image, 400 a multipart form without ``file`` or a malformed one.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = content_type == "multipart/form-data"
    if not multipart and not (content_type.startswith("image/") or content_type in _RAW_TYPES):
        raise UploadError(415, f"unsupported content type {content_type!r}: send the photo as multipart field "
                               "'file' or as a raw image body (image/* or application/octet-stream)")
    max_body = limits.max_upload_bytes + (_MULTIPART_OVERHEAD if multipart else 0)
    too_large = UploadError(413, f"upload larger than the limit of {limits.max_upload_bytes} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        await _drain(request, 0)
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                await _drain(request, size)
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
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                               "properties": {"file": {"type": "string", "format": "binary"}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


def app_from_environment() -> FastAPI:
    """App factory for ``uvicorn --factory`` with several worker processes (``fairage serve --workers N``).

    Reads ``FAIRAGE_SERVE_MODEL`` (model path), ``FAIRAGE_SERVE_DETECTOR``,
    ``FAIRAGE_SERVE_MAX_UPLOAD_BYTES`` and ``FAIRAGE_SERVE_MAX_PIXELS``.
    """
    limits = ServeLimits(
        max_upload_bytes=int(os.environ.get("FAIRAGE_SERVE_MAX_UPLOAD_BYTES", MAX_UPLOAD_BYTES)),
        max_pixels=int(os.environ.get("FAIRAGE_SERVE_MAX_PIXELS", MAX_PIXELS)))
    return create_app(Path(os.environ["FAIRAGE_SERVE_MODEL"]), limits=limits,
                      detector=os.environ.get("FAIRAGE_SERVE_DETECTOR", "auto"))
