"""Tiny random MuseTalk model sets written in the real on-disk formats.

Same files, config keys and state-dict naming as the public weights, only small, so the
real loaders in `musetalk.models` run in tests without downloads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from musetalk.config import ModelPaths
from musetalk.models import MUSETALK_UNET_CONFIG, SD_VAE_CONFIG

TINY_AUDIO_DIM = 64


def tiny_unet_config() -> dict:
    cfg = dict(MUSETALK_UNET_CONFIG)
    cfg.pop("_class_name")  # the public musetalk.json has no class name either
    cfg.update(block_out_channels=[32, 64, 64, 64], layers_per_block=1, norm_num_groups=8, cross_attention_dim=TINY_AUDIO_DIM)
    return cfg


def write_tiny_models(models_dir: Path, landmarks_dir: Path | None, *, with_parser: bool = True, seed: int = 0) -> ModelPaths:
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
