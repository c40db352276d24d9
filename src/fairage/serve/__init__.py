"""``fairage serve``: an HTTP service and a web page for one model, with its model card.

``create_app(model)`` returns the FastAPI app (see ``fairage.serve.app``); run it with
uvicorn. The page is ``static/index.html``, shipped as package data.
"""

from .app import ServeLimits, create_app, serve_protocol
from .batching import CropBatcher
from .uploads import MAX_PIXELS, MAX_UPLOAD_BYTES, UploadError, check_image

__all__ = ["MAX_PIXELS", "MAX_UPLOAD_BYTES", "CropBatcher", "ServeLimits", "UploadError", "check_image", "create_app",
           "serve_protocol"]
