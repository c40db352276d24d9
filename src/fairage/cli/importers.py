"""``fairage import-keras``: foreign weights into a model folder."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import app, console


@app.command("import-keras")
def import_keras_command(
    file: Path = typer.Argument(
        ..., help="Keras 2 HDF5 file (model.save or model.save_weights) of the VGGFace2 ResNet50."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Model folder to create (config.yaml, model.safetensors, import.json)."
    ),
    input_norm: str = typer.Option(
        "vggface2",
        "--input-norm",
        help="Input the network was trained on: vggface2 (BGR 0-255 minus the VGGFace2 mean), caffe or imagenet.",
    ),
) -> None:
    """Convert the course kit's Keras VGGFace2 ResNet50 (optionally with a trained age head) to a fairage model folder."""
    from ..importers.keras import import_keras

    result = import_keras(file, out, input_norm=input_norm)
    _print_import(file, out, result)


def _print_import(file: Path, out: Path, result) -> None:
    """What the import read, mapped, skipped and wrote."""
    backbone = [k for k, v in result.mapping.items() if v.startswith("backbone.")]
    convs = sum(not k.endswith("/bn") for k in backbone)
    console.print(
        f"read {file} ({result.kind} Keras HDF5, keras {result.keras_version or 'version unknown'})",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"  backbone: {len(backbone)} layers ({convs} convolutions, {len(backbone) - convs} BatchNorms) "
        "-> vggface2_resnet50",
        highlight=False,
        soft_wrap=True,
    )
    cfg = result.config.model
    console.print(f"  dim_proj -> projection (2048 -> {cfg.projection_dim}, ReLU)", highlight=False, soft_wrap=True)
    if result.head:
        layers = ", ".join(
            f"{h.name} {h.units} {h.activation}" + (f" (dropout {h.dropout})" if h.dropout else "") for h in result.head
        )
        console.print(
            f"  head: {layers} -> head (activations from {result.head_activations_from})",
            highlight=False,
            soft_wrap=True,
        )
    for line in result.skipped:
        console.print(f"  skipped {line}", highlight=False, soft_wrap=True)
    for line in result.notes:
        console.print(f"[yellow]note:[/yellow] {line}", highlight=False, soft_wrap=True)
    console.print(
        f"input: {cfg.input_norm}, {result.config.data.image_size} px; wrote {out} (config.yaml, "
        f"model.safetensors, import.json); train from it with --set model.weights={out}",
        highlight=False,
        soft_wrap=True,
    )
