"""timm backbones and the published weights of timm and torchvision, loaded from local caches only.

No test touches the network: the Hugging Face hub is switched to offline mode and torch hub's
downloader is replaced by one that fails, so a missing file is an error, never a download.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torchvision import models as tv_models

from fairage.config.schema import HeadBlock, ModelConfig, validate_config
from fairage.errors import ConfigError
from fairage.models.backbones import PretrainedWeightsError
from fairage.models.regressor import build_model

#: timm's tiny test network; its published config normalises with mean 0.5 and std 0.5 (not ImageNet's)
TIMM_MODEL = "test_resnet.r160_in1k"


def tiny(backbone: str, weights=None, **kw) -> ModelConfig:
    return ModelConfig(
        backbone=backbone,
        weights=weights,
        projection_dim=None,
        head=[HeadBlock(units=4)],
        **kw,
    )


def timm_reference(seed: int = 0) -> torch.nn.Module:
    """The timm model with a 10-class classifier, as published checkpoints have one, seeded weights."""
    torch.manual_seed(seed)
    model = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=10).eval()
    with torch.no_grad():  # BatchNorm statistics away from their init, so that they must be loaded too
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def reference_features(ref: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's own pooled features of [0, 1] RGB images: (x - 0.5) / 0.5, then the network without its classifier."""
    with torch.no_grad():
        return ref.forward_head(ref.forward_features((x - 0.5) / 0.5), pre_logits=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_backbone_from_a_local_file_gives_timms_features(tmp_path, suffix):
    ref = timm_reference()
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    model, info = build_model(tiny(f"timm/{TIMM_MODEL}", path))
    model.eval()
    assert model.input_norm.kind == "pretrained" and model.backbone_dim == ref.num_features
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pooled = model.pooled(x)
    assert pooled.shape == (2, ref.num_features)
    assert torch.allclose(pooled, reference_features(ref, x), atol=1e-5)
    assert info["weights_loaded"] and sorted(info["unexpected_keys"]) == [
        "fc.bias",
        "fc.weight",
    ]
    assert model(x).shape == (2,)


def test_timm_input_norm_comes_from_the_pretrained_config():
    cfg = tiny(f"timm/{TIMM_MODEL}")
    assert cfg.input_norm == "pretrained"
    model = build_model(cfg)[0]
    assert model.input_norm(torch.full((1, 3, 2, 2), 0.75)).flatten().tolist() == pytest.approx([0.5] * 12)
    # an explicit convention is kept
    assert tiny(f"timm/{TIMM_MODEL}", input_norm="imagenet").input_norm == "imagenet"


def test_timm_config_errors_name_the_key():
    with pytest.raises(
        ConfigError,
        match="'test_resnt' is not a timm model .did you mean 'timm/test_resnet'",
    ):
        validate_config({"model": {"backbone": "timm/test_resnt"}, "stage2": {}})
    with pytest.raises(ConfigError, match="model.weights 'pretrained' needs a timm backbone"):
        validate_config({"model": {"backbone": "resnet18", "weights": "pretrained"}, "stage2": {}})
    with pytest.raises(ConfigError, match="model.weights 'imagenet' needs a torchvision backbone"):
        validate_config(
            {
                "model": {"backbone": f"timm/{TIMM_MODEL}", "weights": "imagenet"},
                "stage2": {},
            }
        )


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in offline mode (no request can leave the machine); returns the cache folder."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_timm_pretrained_offline_without_a_cached_copy_names_the_file(offline_hub):
    with pytest.raises(PretrainedWeightsError) as err:
        build_model(tiny(f"timm/{TIMM_MODEL}", "pretrained"))
    text = str(err.value)
    assert f"https://huggingface.co/timm/{TIMM_MODEL}/resolve/main/model.safetensors" in text
    assert str(offline_hub) in text and "model.weights=" in text
    assert len(text.splitlines()) == 1


def test_timm_pretrained_resolves_through_timms_cache(offline_hub):
    ref = timm_reference(seed=3)
    # the Hugging Face cache layout: refs/main names the snapshot that holds the file
    repo = offline_hub / f"models--timm--{TIMM_MODEL}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in ref.state_dict().items()},
        str(repo / "snapshots" / commit / "model.safetensors"),
    )
    model, info = build_model(tiny(f"timm/{TIMM_MODEL}", "pretrained"))
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model.eval().pooled(x), reference_features(ref, x), atol=1e-5)
    assert info["weights_loaded"] and info["weights"] == f"timm pretrained {TIMM_MODEL}"


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME whose hub cannot download (a download attempt raises URLError)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch"


def test_torchvision_imagenet_weights_load_from_the_hub_cache(torch_home):
    url = tv_models.ResNet18_Weights.DEFAULT.url
    torch.manual_seed(4)
    reference = tv_models.resnet18(weights=None).state_dict()
    target = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True)
    torch.save(reference, target)
    model, info = build_model(tiny("resnet18", "imagenet"))
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], reference[k]) for k in own)
    assert info["weights"] == str(target) and sorted(info["unexpected_keys"]) == [
        "fc.bias",
        "fc.weight",
    ]
    assert model.input_norm.kind == "imagenet"


def test_torchvision_imagenet_weights_offline_name_the_file_and_the_folder(torch_home):
    with pytest.raises(PretrainedWeightsError) as err:
        build_model(tiny("resnet34", "imagenet"))
    url = tv_models.ResNet34_Weights.DEFAULT.url
    text = str(err.value)
    assert url in text and str(torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]) in text


def test_a_timm_backbone_trains_through_both_stages(tmp_path):
    from conftest import tiny_synthetic

    from fairage.config.presets import load_preset
    from fairage.store.predictions import read_predictions
    from fairage.training import train

    data = tiny_synthetic(tmp_path / "data", n_train=24, n_valid=8, n_test=8)
    cfg = load_preset(
        "M5",
        "tiny",
        [
            f"model.backbone=timm/{TIMM_MODEL}",
            "model.output=corn",
            "stage1.max_epochs=1",
            "stage2.max_epochs=1",
            "eval.n_boot=0",
            "eval.n_perm=0",
        ],
    )
    assert cfg.model.input_norm == "pretrained" and cfg.stage2.loss == "corn"
    train(cfg, data, tmp_path / "run", progress=False)
    preds = read_predictions(tmp_path / "run" / "predictions_test.csv")
    assert len(preds) == 8 and "spread" in preds.columns
