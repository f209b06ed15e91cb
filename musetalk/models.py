"""Loading the MuseTalk v1.5 networks from their public on-disk formats.

This is the only module that reads checkpoints. Nothing is downloaded here: a missing,
truncated or mismatched file raises one `MissingWeightsError` that lists every problem
and the command that fetches the weights (`bash download_weights.sh`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from loguru import logger

from musetalk.config import FETCH_COMMAND, ModelPaths, RuntimeSettings
from musetalk.errors import ConfigError, MissingWeightsError
from musetalk.weight_files import build_registry

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from musetalk.face.landmarks import FaceLandmarker
    from musetalk.face.parsing import FaceParser

# Published configurations (facts from the public checkpoints). The bench builds
# full-size random networks from them; tests scale them down.
MUSETALK_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
WHISPER_TINY_CONFIG: dict[str, Any] = {
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_layers": 4,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "vocab_size": 51865,
    "max_source_positions": 1500,
    "max_target_positions": 448,
}

FACE_PARSING_WEIGHTS = "79999_iter.pth"


def resolve_runtime(settings: RuntimeSettings) -> tuple[torch.device, torch.dtype]:
    """CUDA fp16 when a GPU is there, CPU fp32 otherwise; bf16/fp16 are refused on CPU.

    On CPUs without bf16/fp16 units those types run hundreds of times slower, so a
    request for them on CPU is an error rather than a silent slowdown.
    """
    if settings.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(settings.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("MUSETALK_DEVICE=cuda was asked for, but PyTorch sees no CUDA GPU. Use auto or cpu.")
    if settings.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, settings.dtype)
    if device.type == "cpu" and dtype != torch.float32:
        raise ConfigError(f"{settings.dtype} on CPU is far slower than float32 here; use float32 (or dtype auto).")
    return device, dtype


def _first_existing(directory: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


def _check_file(path: Path, problems: list[str]) -> None:
    if not path.is_file():
        problems.append(f"missing {path}")
    elif path.stat().st_size == 0:
        problems.append(f"empty file {path}")


def check_weights(paths: ModelPaths, *, include_optional: bool = False) -> list[str]:
    """Every missing or empty required file, as readable lines (empty list when all are there).

    The files are the registry's (`musetalk.weight_files`): the required ones, and with
    `include_optional` the optional ones these models load too (face parsing: without it
    avatars use the landmark-polygon mask).
    """
    problems: list[str] = []
    for spec in build_registry():
        if not (spec.required or (include_optional and spec.loaded)):
            continue
        target = paths.models_dir / spec.target
        found = _first_existing(target.parent, (target.name, *spec.alternates))
        if found is None and spec.alternates:
            problems.append(f"missing {target} (or {', '.join(spec.alternates)})")
        else:
            _check_file(found or target, problems)
    return problems


def _fail(paths: ModelPaths, problems: list[str]) -> MissingWeightsError:
    return MissingWeightsError(problems, str(paths.models_dir), FETCH_COMMAND)


def load_unet(paths: ModelPaths, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    """`musetalk.json` (diffusers UNet2DConditionModel config) + `unet.pth` (plain state dict)."""
    from diffusers import UNet2DConditionModel

    try:
        config = json.loads(paths.unet_config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise _fail(paths, [f"unreadable {paths.unet_config}: {exc}"]) from exc
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError) as exc:
        raise _fail(paths, [f"{paths.unet_config} is not a UNet2DConditionModel config: {exc}"]) from exc
    try:
        state = torch.load(paths.unet_weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt archives
        raise _fail(paths, [f"unreadable or truncated {paths.unet_weights}: {exc}"]) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise _fail(paths, [f"{paths.unet_weights} is not a state dict"])
    state = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}
    try:
        unet.load_state_dict(state, strict=True, assign=True)  # assign: parameters take the loaded tensors
    except RuntimeError as exc:
        raise _fail(paths, [f"{paths.unet_weights} does not match {paths.unet_config}: {_short(exc)}"]) from exc
    return unet.to(device).eval().requires_grad_(False)


def load_vae(paths: ModelPaths, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """sd-vae-ft-mse in diffusers format (`config.json` + `diffusion_pytorch_model.*`)."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(paths.vae_dir, torch_dtype=dtype, local_files_only=True)
    except Exception as exc:  # diffusers wraps shape, key and file errors in several types
        raise _fail(paths, [f"cannot load the VAE from {paths.vae_dir}: {_short(exc)}"]) from exc
    return vae.to(device=device).eval().requires_grad_(False)


def load_whisper(
    paths: ModelPaths, device: torch.device, dtype: torch.dtype
) -> tuple[WhisperEncoder, WhisperFeatureExtractor]:
    """The whisper-tiny encoder (decoder dropped) and its log-mel feature extractor."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    try:
        extractor = WhisperFeatureExtractor.from_pretrained(paths.whisper_dir, local_files_only=True)
    except Exception as exc:
        raise _fail(paths, [f"cannot read {paths.whisper_dir / 'preprocessor_config.json'}: {_short(exc)}"]) from exc
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own logs say what is loading
    try:
        model, info = WhisperModel.from_pretrained(
            paths.whisper_dir, dtype=dtype, local_files_only=True, output_loading_info=True
        )
    except Exception as exc:
        raise _fail(paths, [f"cannot load whisper from {paths.whisper_dir}: {_short(exc)}"]) from exc
    missing = [k for k in info.get("missing_keys", []) if "encoder" in k]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        detail = ", ".join(list(missing)[:5] + [str(m) for m in list(mismatched)[:5]])
        raise _fail(paths, [f"whisper weights in {paths.whisper_dir} do not fit its config.json ({detail})"])
    encoder = model.encoder.to(device=device).eval().requires_grad_(False)
    return encoder, extractor


def load_face_parser(paths: ModelPaths, device: torch.device) -> FaceParser | None:
    """BiSeNet face parsing, or None when its weights are absent (polygon masks are used then)."""
    from musetalk.face.parsing import FaceParser

    if not (paths.face_parsing_dir / FACE_PARSING_WEIGHTS).is_file():
        logger.warning(
            "Face-parsing weights not found in {}: avatars will use the landmark-polygon mask. "
            "Run {} for the v1.5 jaw mask.",
            paths.face_parsing_dir,
            FETCH_COMMAND,
        )
        return None
    # Parsing runs once per avatar frame at preparation; fp32 keeps masks identical on every device.
    return FaceParser.from_pretrained(paths.face_parsing_dir, device=device, dtype=torch.float32)


def load_landmarker(paths: ModelPaths) -> FaceLandmarker:
    from musetalk.face.landmarks import FaceLandmarker

    return FaceLandmarker.from_pretrained(paths.face_landmarks_dir)


def _short(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


@dataclass
class Models:
    """Every network the engine needs, on one device. One copy per process, shared by all users."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    whisper: WhisperEncoder
    feature_extractor: WhisperFeatureExtractor
    landmarker: FaceLandmarker
    face_parser: FaceParser | None
    device: torch.device
    dtype: torch.dtype
    paths: ModelPaths | None = None

    @property
    def audio_dim(self) -> int:
        return int(self.whisper.config.d_model)

    def describe(self) -> str:
        return f"{self.device.type} {str(self.dtype).removeprefix('torch.')}"


def load_models(paths: ModelPaths, runtime: RuntimeSettings | None = None) -> Models:
    """Load everything, after checking that every file is there (one error lists all that are not)."""
    device, dtype = resolve_runtime(runtime or RuntimeSettings())
    problems = check_weights(paths)
    if problems:
        raise _fail(paths, problems)
    logger.info("Loading MuseTalk v1.5 models from {} on {} {}", paths.models_dir, device, dtype)
    unet = load_unet(paths, device, dtype)
    vae = load_vae(paths, device, dtype)
    whisper, extractor = load_whisper(paths, device, dtype)
    check_compatible(unet, whisper, paths)
    from musetalk.accel import optimize_for_inference  # exact speed-ups measured by musetalk.bench

    return optimize_for_inference(
        Models(
            unet=unet,
            vae=vae,
            whisper=whisper,
            feature_extractor=extractor,
            landmarker=load_landmarker(paths),
            face_parser=load_face_parser(paths, device),
            device=device,
            dtype=dtype,
            paths=paths,
        )
    )


def check_compatible(unet: UNet2DConditionModel, whisper: WhisperEncoder, paths: ModelPaths) -> None:
    """The UNet cross-attends to whisper states: their widths must agree."""
    if int(unet.config.cross_attention_dim) != int(whisper.config.d_model):
        raise _fail(
            paths,
            [
                f"{paths.unet_config} expects {unet.config.cross_attention_dim}-wide audio features but "
                f"{paths.whisper_dir} produces {whisper.config.d_model}: they are from different model sets"
            ],
        )
    if int(unet.config.in_channels) != 8:
        raise _fail(paths, [f"{paths.unet_config}: in_channels must be 8 (masked + reference latents)"])
