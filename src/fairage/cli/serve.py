"""``fairage serve`` and ``fairage model-card``."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import app, console


@app.command("model-card")
def model_card_command(
    model: Path = typer.Argument(..., help="A run folder, an imported model folder or an exported model file."),
    out: Path | None = typer.Option(
        None, "--out", help="Write the card here (.md Markdown, .json JSON); default: print Markdown."
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Dataset folder for the training-data summary (default: the run's recorded data_dir)."
    ),
) -> None:
    """The model card: training data by group, configuration, test MAE and bias scores with intervals, warnings."""
    from ..outputs.modelcard import build_model_card, card_markdown, write_model_card

    if out is None:
        print(card_markdown(build_model_card(model, data)), end="")
        return
    card = write_model_card(model, out, data)
    console.print(f"wrote the model card of {card['name']} ({card['kind']}) to {out}", highlight=False)


@app.command("serve")
# size: typer command: its parameters are the CLI options
def serve_command(
    model: Path = typer.Argument(..., help="A run folder, an imported model folder or an exported model file."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port."),
    workers: int = typer.Option(1, "--workers", min=1, help="Server processes, each with its own copy of the model."),
    detector: str = typer.Option("auto", "--detector", help="Face detector: auto, yunet, haar, dlib."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", min=0.001, help="Largest upload, MiB (413 above)."),
    max_pixels: int = typer.Option(
        40_000_000, "--max-pixels", min=1, help="Largest decoded image, pixels (413 above)."
    ),
    max_batch: int = typer.Option(
        32, "--max-batch", help="Faces of concurrent requests in one forward pass, 1-4096 (1: each request alone)."
    ),
    batch_wait_ms: float = typer.Option(
        5.0, "--batch-wait-ms", help="Milliseconds a request's faces wait for other requests' to share a pass, 0-1000."
    ),
    prepare_threads: int = typer.Option(
        2, "--prepare-threads", help="Threads that decode, detect and crop uploads, 1-64 (with --prepare-processes 0)."
    ),
    prepare_processes: int | None = typer.Option(
        None,
        "--prepare-processes",
        help="Worker processes that "
        "decode, detect and crop uploads, 0-64 (default: the usable "
        "CPUs; 0: the --prepare-threads of the server process).",
    ),
    detect_side: int = typer.Option(
        0,
        "--detect-side",
        help="Longer side, px, photos are downscaled to for "
        "detection in the prepare processes (0: the detector's own, 960 for yunet, as "
        "fairage predict; smaller is faster and misses more small faces).",
    ),
    detector_threads: int = typer.Option(
        1, "--detector-threads", help="OpenMP threads per YuNet call (0: OpenMP's default, every core)."
    ),
    runtime: str = typer.Option(
        "auto", "--runtime", help="Age model runtime: auto (the faster here, timed at start), torch, onnxruntime."
    ),
    model_threads: int = typer.Option(
        1, "--model-threads", min=1, max=256, help="CPU threads of each forward pass (torch and onnxruntime)."
    ),
    log_level: str = typer.Option(
        "info", "--log-level", help="uvicorn log level: critical, error, warning, info, debug."
    ),
) -> None:
    """HTTP service and web page: POST /predict (photo -> faces, ages), GET /model (model card), GET / (page)."""
    from ..serve import ServeLimits, ServeSettings, run_service
    from ..serve.prepare import usable_cpus

    limits = ServeLimits(
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_pixels=max_pixels,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        prepare_threads=prepare_threads,
        prepare_processes=usable_cpus() if prepare_processes is None else prepare_processes,
        detect_side=detect_side,
    )
    settings = ServeSettings(model, limits, detector, detector_threads, runtime, model_threads)
    # the model and its card load here first, so a bad path is one message and exit 2, in any mode
    application = settings.create_app()
    console.print(_serving_line(settings, application, host, port, workers), highlight=False)
    if workers > 1:
        application = None  # each worker process loads its own copy
    run_service(settings, application, host, port, workers, log_level)


def _serving_line(settings, application, host: str, port: int, workers: int) -> str:
    pool = application.state.prepare_pool
    preparing = (
        f"{pool.processes} prepare process(es)"
        if pool is not None
        else f"{settings.limits.prepare_threads} prepare thread(s)"
    )
    return (
        f"serving {settings.model} on http://{host}:{port}/ with {workers} worker(s), {preparing}, age model on "
        f"{getattr(application.state.predictor, 'runtime', 'its own runtime')}; Ctrl-C stops"
    )
