"""``fairage export``: a model as ONNX or TorchScript."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import app, console


@app.command("export")
def export_command(
    model: Path = typer.Argument(..., help="A run folder or a model folder."),
    format_: str = typer.Option("onnx", "--format", help="onnx or torchscript."),
    out: Path = typer.Option(..., "--out", help="File to write, e.g. model.onnx or model.pt."),
    opset: int = typer.Option(17, "--opset", min=9, help="ONNX opset."),
) -> None:
    """Export a model: input RGB float [0, 1] NCHW (dynamic batch), output age in years; metadata inside."""
    from ..inference.export import export_model
    from ..inference.predictor import load_model

    loaded = load_model(model)
    path = export_model(loaded, out, format_, opset=opset)
    console.print(
        f"wrote {path} ({format_}): input 'image' float32 (N, 3, {loaded.image_size}, "
        f"{loaded.image_size}) RGB in [0, 1], output 'age' (N,) years",
        highlight=False,
        soft_wrap=True,
    )
