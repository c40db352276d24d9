"""``fairage serve``: an HTTP service and a web page for one model, with its model card.

``create_app(model)`` returns the FastAPI app (see ``fairage.serve.app``); run it with
uvicorn. The page is ``static/index.html``, shipped as package data.

Names are imported on first use, so the service's prepare worker processes
(``fairage.serve.prepare``) load neither the web framework nor torch.
"""

from importlib import import_module

_NAMES = {
    "ServeLimits": "app",
    "ServeSettings": "app",
    "run_service": "app",
    "create_app": "app",
    "serve_protocol": "app",
    "CropBatcher": "batching",
    "PreparePool": "prepare",
    "MAX_PIXELS": "uploads",
    "MAX_UPLOAD_BYTES": "uploads",
    "UploadError": "uploads",
    "check_image": "uploads",
}

__all__ = [
    "MAX_PIXELS",
    "MAX_UPLOAD_BYTES",
    "CropBatcher",
    "PreparePool",
    "ServeLimits",
    "ServeSettings",
    "UploadError",
    "check_image",
    "create_app",
    "run_service",
    "serve_protocol",
]


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'fairage.serve' has no attribute {name!r}")
    value = getattr(import_module(f".{_NAMES[name]}", __name__), name)
    globals()[name] = value
    return value
