"""Offline render: a speech file -> a lip-synced mp4 of a prepared avatar (H.264 + AAC, 25 fps)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from musetalk.audio import AudioFeatureEncoder, frame_count_for
from musetalk.avatar.store import Avatar
from musetalk.config import AUDIO_SAMPLE_RATE, VIDEO_FPS
from musetalk.generate import LipSyncGenerator
from musetalk.media import load_audio, write_mp4
from musetalk.models import Models


@dataclass(frozen=True)
class RenderResult:
    path: Path
    frames: int
    audio_seconds: float

    @property
    def video_seconds(self) -> float:
        return self.frames / VIDEO_FPS


def render(
    models: Models,
    avatar: Avatar,
    audio_path: str | Path,
    out_path: str | Path,
    *,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RenderResult:
    """Lip-sync `audio_path` (any format, rate or channel count) onto `avatar`.

    The video has one frame per started 40 ms of audio, so its duration matches the
    audio to within one frame; the original audio track is muxed unchanged (re-encoded
    to AAC). The file appears only when complete.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    audio = load_audio(audio_path)
    frames = frame_count_for(len(audio))
    logger.info(
        "Rendering {} frames ({:.2f} s of audio) with avatar {!r}", frames, len(audio) / AUDIO_SAMPLE_RATE, avatar.name
    )
    encoder = AudioFeatureEncoder(models.whisper, models.feature_extractor, models.device, models.dtype)
    features = encoder.frame_features(audio, frames)
    generator = LipSyncGenerator(models, avatar, batch_size=batch_size)
    try:
        write_mp4(
            out_path,
            generator.generate(features),
            frame_count=frames,
            size=avatar.size,
            audio_path=audio_path,
            on_frame=(lambda i: progress(i, frames)) if progress else None,
        )
    finally:
        generator.close()
    return RenderResult(out_path, frames, len(audio) / AUDIO_SAMPLE_RATE)
