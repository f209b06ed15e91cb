"""Settings as frozen dataclasses, plus the user's `realtime.yaml` avatar format.

Everything configurable lives here so components receive their settings instead of
reading globals or environment variables deep inside.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from musetalk.errors import ConfigError

VIDEO_FPS = 25
AUDIO_SAMPLE_RATE = 16_000
SAMPLES_PER_VIDEO_FRAME = AUDIO_SAMPLE_RATE // VIDEO_FPS  # 640 samples = 40 ms
MODEL_VERSION = "v15"
FETCH_COMMAND = "bash download_weights.sh"


@dataclass(frozen=True)
class ModelPaths:
    """Where each weight set lives inside the models folder (the layout download_weights.sh writes)."""

    models_dir: Path

    @property
    def unet_config(self) -> Path:
        return self.models_dir / "musetalkV15" / "musetalk.json"

    @property
    def unet_weights(self) -> Path:
        return self.models_dir / "musetalkV15" / "unet.pth"

    @property
    def vae_dir(self) -> Path:
        return self.models_dir / "sd-vae"

    @property
    def whisper_dir(self) -> Path:
        return self.models_dir / "whisper"

    @property
    def face_parsing_dir(self) -> Path:
        return self.models_dir / "face-parse-bisent"

    @property
    def face_landmarks_dir(self) -> Path:
        return self.models_dir / "face-landmarks"

    @property
    def dwpose(self) -> Path:
        """DWPose-l ONNX export (optional): the official landmark source."""
        return self.models_dir / "dwpose" / "dw-ll_ucoco_384.onnx"


@dataclass(frozen=True)
class RuntimeSettings:
    """Device choice: `auto` means CUDA fp16 when a GPU is present, else CPU fp32."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float16 | float32 (bfloat16 only on CUDA)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"Unknown device {self.device!r}: use auto, cpu or cuda (MUSETALK_DEVICE).")
        if self.dtype not in ("auto", "float16", "float32", "bfloat16"):
            raise ConfigError(f"Unknown dtype {self.dtype!r}: use auto, float16 or float32.")


LANDMARK_CHOICES = ("auto", "dwpose", "offline")


@dataclass(frozen=True)
class PrepareSettings:
    """Everything that shapes a prepared avatar; stored in its manifest."""

    bbox_shift: int = 0
    extra_margin: int = 10
    parsing_mode: str = "jaw"  # jaw | raw | polygon
    cheek_width: int = 90
    max_side: int = 1920  # frames whose long side is larger (4K...) are scaled down to it; smaller stay native
    max_seconds: float = 60.0  # longer clips are cut: the idle loop never needs more
    landmarks: str = "auto"  # auto (DWPose when its weights are present, else offline) | dwpose | offline

    def __post_init__(self) -> None:
        if self.parsing_mode not in ("jaw", "raw", "polygon"):
            raise ConfigError(f"parsing_mode must be jaw, raw or polygon, not {self.parsing_mode!r}.")
        if not -200 <= self.bbox_shift <= 200:
            raise ConfigError(f"bbox_shift {self.bbox_shift} is out of range (-200..200 pixels).")
        if not 0 <= self.extra_margin <= 200:
            raise ConfigError(f"extra_margin {self.extra_margin} is out of range (0..200 pixels).")
        if not 0 <= self.cheek_width <= 256:
            raise ConfigError(f"cheek_width {self.cheek_width} is out of range (0..256).")
        if self.max_side < 256:
            raise ConfigError("max_side must be at least 256 pixels.")
        if self.max_seconds <= 0:
            raise ConfigError("max_seconds must be positive.")
        if self.landmarks not in LANDMARK_CHOICES:
            raise ConfigError(f"landmarks must be one of {', '.join(LANDMARK_CHOICES)}, not {self.landmarks!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AvatarEntry:
    """One avatar of the user's `configs/inference/realtime.yaml`."""

    name: str
    preparation: bool
    bbox_shift: int
    video_path: Path | None
    audio_clips: dict[str, Path] = field(default_factory=dict)


def models_dir_from_env() -> Path:
    return Path(os.environ.get("MUSETALK_MODELS_DIR", "models"))


def avatars_dir_from_env() -> Path:
    return Path(os.environ.get("MUSETALK_AVATARS_DIR", "avatars"))


def runtime_from_env() -> RuntimeSettings:
    return RuntimeSettings(device=os.environ.get("MUSETALK_DEVICE", "auto"))


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise ConfigError(f"{where}: expected True or False, got {value!r}.")


def load_realtime_config(path: str | Path) -> list[AvatarEntry]:
    """Read the seed's avatar YAML (`avatar_1: {preparation, bbox_shift, video_path, audio_clips}`).

    Relative media paths are taken relative to the current directory, as the user's
    document does (`data/video/person1.mp4`). Order is kept: the first avatar is the default.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Avatar config {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"Avatar config {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"Avatar config {path} must map avatar names to settings, e.g. 'avatar_1: {{...}}'.")
    entries = []
    for name, body in data.items():
        where = f"{path}: {name}"
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: expected a mapping with preparation, bbox_shift, video_path.")
        preparation = _as_bool(body.get("preparation", False), f"{where}.preparation")
        try:
            bbox_shift = int(body.get("bbox_shift", 0))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}.bbox_shift must be an integer.") from exc
        video = body.get("video_path")
        if preparation and not video:
            raise ConfigError(f"{where}: preparation is True but video_path is missing.")
        clips = body.get("audio_clips") or {}
        if not isinstance(clips, dict):
            raise ConfigError(f"{where}.audio_clips must map clip names to audio files.")
        entries.append(
            AvatarEntry(
                name=str(name),
                preparation=preparation,
                bbox_shift=bbox_shift,
                video_path=Path(video) if video else None,
                audio_clips={str(k): Path(v) for k, v in clips.items()},
            )
        )
    return entries


def save_realtime_config(entries: list[AvatarEntry], path: str | Path) -> None:
    """Write the seed format atomically (temp file + rename)."""
    path = Path(path)
    data = {
        e.name: {
            "preparation": e.preparation,
            "bbox_shift": e.bbox_shift,
            "video_path": str(e.video_path) if e.video_path else None,
            "audio_clips": {k: str(v) for k, v in e.audio_clips.items()},
        }
        for e in entries
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
