"""Model loading from the real on-disk formats: tiny random weights, real loaders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from musetalk.config import ModelPaths, RuntimeSettings
from musetalk.errors import ConfigError, MissingWeightsError
from musetalk.models import check_weights, load_models, resolve_runtime


def test_tiny_models_load_on_cpu_fp32(models):
    assert models.device.type == "cpu"
    assert models.dtype == torch.float32
    assert models.unet.config.in_channels == 8
    assert models.whisper.config.d_model == models.unet.config.cross_attention_dim
    assert models.face_parser is not None
    # One real forward pass through the UNet with MuseTalk's call signature.
    out = models.unet(
        torch.zeros(2, 8, 32, 32),
        torch.zeros(1, dtype=torch.long),
        encoder_hidden_states=torch.zeros(2, 50, models.audio_dim),
    ).sample
    assert out.shape == (2, 4, 32, 32)


def test_runtime_rules():
    assert resolve_runtime(RuntimeSettings(device="cpu")) == (torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match="float32"):
        resolve_runtime(RuntimeSettings(device="cpu", dtype="bfloat16"))
    with pytest.raises(ConfigError):
        RuntimeSettings(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_runtime(RuntimeSettings(device="cuda"))


def test_empty_models_dir_lists_every_missing_file(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        load_models(ModelPaths(tmp_path), RuntimeSettings(device="cpu"))
    text = str(err.value)
    for needed in (
        "musetalk.json",
        "unet.pth",
        "sd-vae",
        "whisper",
        "preprocessor_config.json",
        "face_landmark.tflite",
    ):
        assert needed in text
    assert "bash download_weights.sh" in text
    assert len(err.value.problems) >= 8


@pytest.fixture
def models_copy(tiny_models_dir, tmp_path):
    dst = tmp_path / "models"
    shutil.copytree(tiny_models_dir, dst)
    return ModelPaths(dst)


def test_missing_single_file_is_named(models_copy):
    models_copy.unet_weights.unlink()
    assert check_weights(models_copy) == [f"missing {models_copy.unet_weights}"]
    with pytest.raises(MissingWeightsError, match="unet.pth"):
        load_models(models_copy, RuntimeSettings(device="cpu"))


def test_truncated_unet_is_reported(models_copy):
    data = models_copy.unet_weights.read_bytes()
    models_copy.unet_weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(MissingWeightsError, match=r"truncated .*unet.pth"):
        load_models(models_copy, RuntimeSettings(device="cpu"))


def test_wrong_shaped_unet_is_reported(models_copy):
    cfg = json.loads(models_copy.unet_config.read_text())
    cfg["block_out_channels"] = [16, 32, 32, 32]  # the weights were saved for 32/64
    models_copy.unet_config.write_text(json.dumps(cfg))
    with pytest.raises(MissingWeightsError, match="does not match"):
        load_models(models_copy, RuntimeSettings(device="cpu"))


def test_truncated_vae_is_reported(models_copy):
    weights = next(models_copy.vae_dir.glob("diffusion_pytorch_model.*"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(MissingWeightsError, match="VAE"):
        load_models(models_copy, RuntimeSettings(device="cpu"))


def test_mismatched_audio_width_is_reported(models_copy):
    cfg = json.loads(models_copy.unet_config.read_text())
    cfg["cross_attention_dim"] = 384
    models_copy.unet_config.write_text(json.dumps(cfg))
    with pytest.raises(MissingWeightsError):
        load_models(models_copy, RuntimeSettings(device="cpu"))


def test_missing_parser_falls_back(models_copy):
    shutil.rmtree(models_copy.face_parsing_dir)
    models = load_models(models_copy, RuntimeSettings(device="cpu"))
    assert models.face_parser is None
