"""Random MuseTalk networks and synthetic inputs, shared by the benchmarks, the serve tiny mode and the tests.

* `build_random_models`: full-size (or tiny) MuseTalk v1.5 architectures with random weights,
  built on the meta device then materialised (no weight files needed); `model_configs` and
  `meta_models` give their configs and shape-only copies.
* `write_tiny_models`: tiny random model sets written in the real on-disk formats (same
  files, config keys and state-dict naming as the public weights, only small), so the real
  loaders in `musetalk.models` run without downloads.
* `synthetic_avatar`, `synthetic_features`: a prepared-avatar stand-in and random audio
  windows, for runs that need no real video or speech.

Speed and plumbing only: random weights draw no face.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from musetalk.avatar.store import Avatar, AvatarManifest, now_iso
from musetalk.config import VIDEO_FPS, ModelPaths
from musetalk.face.box import crop_box as make_crop_box
from musetalk.face.mask import blur_kernel_size
from musetalk.models import MUSETALK_UNET_CONFIG, SD_VAE_CONFIG, WHISPER_TINY_CONFIG, Models

FRAME_SIZE = (1280, 720)  # (width, height)
FACE_BOX = (515, 210, 765, 510)  # 250 x 300, a typical face in a 720p talking-head video
TINY_AUDIO_DIM = 64  # the width of `write_tiny_models`' whisper states


# ====================================================================== random models
def _plain(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def model_configs(tiny: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(UNet, VAE, whisper) configs: the published ones, or scaled-down ones with the same structure."""
    unet, vae, whisper = _plain(MUSETALK_UNET_CONFIG), _plain(SD_VAE_CONFIG), dict(WHISPER_TINY_CONFIG)
    if tiny:
        unet.update(block_out_channels=[32, 64, 64, 64], layers_per_block=1, norm_num_groups=8, cross_attention_dim=64)
        vae.update(block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8)
        whisper.update(d_model=64, encoder_attention_heads=2, encoder_ffn_dim=128, decoder_layers=1,
                       decoder_attention_heads=2, decoder_ffn_dim=128, vocab_size=64, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)  # fmt: skip
    return unet, vae, whisper


def meta_models(tiny: bool):
    """(UNet, VAE encoder-decoder, whisper encoder) of `model_configs(tiny)` on the meta device: shapes, no memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    unet_cfg, vae_cfg, whisper_cfg = model_configs(tiny)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        whisper = WhisperEncoder(WhisperConfig(**whisper_cfg))
    return unet.eval(), vae.eval(), whisper.eval()


@torch.no_grad()
def _random_init(module: torch.nn.Module, seed: int, last_conv_gain: dict[str, float] | None = None) -> None:
    """Fast random weights with sane activations: uniform with variance 1/fan_in, norms at 1.

    Copies slices of one random pool instead of drawing 850M numbers (the pool offsets are
    random, so tensors differ); biases small. `last_conv_gain` scales named weights down
    (the decoder's output conv) so that decoded faces span the uint8 range without saturating.
    """
    device = next(module.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    chunk = 1 << 21
    pool = (torch.rand(2 * chunk, generator=gen) * 2 - 1).to(device)  # variance 1/3
    for name, p in module.named_parameters():
        flat = p.view(-1)
        if p.ndim >= 2:
            scale = math.sqrt(3.0 / p[0].numel()) * (last_conv_gain or {}).get(name, 1.0)
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
            continue
        else:
            scale = 0.02 * math.sqrt(3.0)
        for start in range(0, flat.numel(), chunk):
            n = min(chunk, flat.numel() - start)
            offset = int(torch.randint(0, chunk, (1,), generator=gen))
            flat[start : start + n].copy_(pool[offset : offset + n]).mul_(scale)
    for _, b in module.named_buffers():
        b.zero_()


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers warns on every `.to(dtype)` of a model not loaded with `torch_dtype`; not useful here."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def build_random_models(
    *, tiny: bool = False, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int = 0
) -> Models:
    """Full-size (or tiny) MuseTalk networks with random weights, built on meta then materialised."""
    from transformers import WhisperFeatureExtractor

    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    unet, vae, whisper = meta_models(tiny)
    modules = []
    for i, (m, gain) in enumerate(((unet, None), (vae, {"decoder.conv_out.weight": 0.3}), (whisper, None))):
        m = m.to_empty(device=device)
        _random_init(m, seed + i, gain)
        if dtype != torch.float32:
            with _quiet_diffusers():
                m = m.to(dtype)
        modules.append(m.eval().requires_grad_(False))
    unet, vae, whisper = modules
    return Models(
        unet=unet, vae=vae, whisper=whisper, feature_extractor=WhisperFeatureExtractor(feature_size=80),
        landmarker=None, face_parser=None, device=device, dtype=dtype,  # type: ignore[arg-type]
    )  # fmt: skip


# ====================================================================== tiny models on disk
def tiny_unet_config() -> dict:
    cfg = dict(MUSETALK_UNET_CONFIG)
    cfg.pop("_class_name")  # the public musetalk.json has no class name either
    cfg.update(
        block_out_channels=[32, 64, 64, 64], layers_per_block=1, norm_num_groups=8, cross_attention_dim=TINY_AUDIO_DIM
    )
    return cfg


def write_tiny_models(
    models_dir: Path, landmarks_dir: Path | None, *, with_parser: bool = True, seed: int = 0
) -> ModelPaths:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    paths = ModelPaths(Path(models_dir))
    paths.unet_config.parent.mkdir(parents=True, exist_ok=True)
    cfg = tiny_unet_config()
    paths.unet_config.write_text(json.dumps(cfg, indent=2))
    unet = UNet2DConditionModel.from_config(cfg)
    torch.save(unet.state_dict(), paths.unet_weights)

    vae_cfg = dict(SD_VAE_CONFIG)
    vae_cfg.pop("_class_name")
    vae_cfg.update(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=8)
    AutoencoderKL.from_config(vae_cfg).save_pretrained(paths.vae_dir)

    whisper_cfg = WhisperConfig(
        d_model=TINY_AUDIO_DIM, encoder_layers=4, encoder_attention_heads=2, encoder_ffn_dim=128,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=128, vocab_size=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        num_mel_bins=80, max_source_positions=1500, max_target_positions=32,
    )  # fmt: skip
    WhisperForConditionalGeneration(whisper_cfg).save_pretrained(paths.whisper_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(paths.whisper_dir)

    if with_parser:
        from musetalk.face.parsing import save_random_parser

        # Random weights, except the main head scores "skin" (class 1) everywhere: a random
        # parser finds no skin, and an empty mask would hide the generated face from tests.
        path = save_random_parser(paths.face_parsing_dir, base_channels=8, seed=seed)
        state = torch.load(path, weights_only=True)
        head = torch.zeros_like(state["conv_out.conv_out.weight"])
        head[1] = 1.0
        state["conv_out.conv_out.weight"] = head
        torch.save(state, path)
    if landmarks_dir is not None:
        shutil.copytree(landmarks_dir, paths.face_landmarks_dir, dirs_exist_ok=True)
    return paths


# ====================================================================== synthetic avatar
def synthetic_avatar(
    *, frames: int = 8, size: tuple[int, int] = FRAME_SIZE, face_box: Sequence[int] = FACE_BOX, seed: int = 0
) -> Avatar:
    """A prepared-avatar stand-in: smooth random 720p frames, a jittered ~250x300 face box, the
    MuseTalk crop box around it, a blurred lower-face mask at crop size, random latents."""
    rng = np.random.default_rng(seed)
    width, height = size
    frame_list, masks, boxes, crops = [], [], [], []
    for _ in range(frames):
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        frame = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
        frame = cv2.add(frame, rng.integers(0, 8, frame.shape, dtype=np.uint8))  # sensor noise
        dx, dy = (int(v) for v in rng.integers(-6, 7, 2))
        x0, y0, x1, y1 = (int(face_box[0]) + dx, int(face_box[1]) + dy, int(face_box[2]) + dx, int(face_box[3]) + dy)
        cb = make_crop_box((x0, y0, x1, y1), (width, height))
        cw, ch = cb[2] - cb[0], cb[3] - cb[1]
        mask = np.zeros((ch, cw), np.uint8)
        fx0, fy0, fx1, fy1 = x0 - cb[0], y0 - cb[1], x1 - cb[0], y1 - cb[1]
        centre = ((fx0 + fx1) // 2, (fy0 + fy1) // 2)
        cv2.ellipse(
            mask, (centre[0], (fy0 + 3 * fy1) // 4), ((fx1 - fx0) * 9 // 20, (fy1 - fy0) * 3 // 8), 0, 0, 360, 255, -1
        )
        mask[: centre[1]] = 0  # only below the box centre line, as MuseTalk's v1.5 mask
        k = blur_kernel_size(cw)
        mask = cv2.GaussianBlur(mask, (k, k), 0)
        frame_list.append(frame)
        masks.append(mask)
        boxes.append((x0, y0, x1, y1))
        crops.append(cb)
    latents = torch.from_numpy(rng.standard_normal((frames, 8, 32, 32), dtype=np.float32))
    manifest = AvatarManifest(
        name="bench", fps=VIDEO_FPS, frame_count=frames, frame_size=(width, height), source_video="synthetic",
        preparation={"synthetic": True}, created=now_iso(),
    )  # fmt: skip
    return Avatar(manifest, frame_list, masks, np.asarray(boxes, np.int32), np.asarray(crops, np.int32), latents)


def synthetic_features(frames: int, dim: int, *, seed: int = 0) -> torch.Tensor:
    """Random per-frame audio windows `(frames, 50, dim) float32` in the range of whisper states."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(frames, 50, dim, generator=gen)
