"""Reading video and audio in any common format, and writing H.264 + AAC mp4 files.

Decoding goes through the ffmpeg binary bundled with `imageio-ffmpeg`, so no system
ffmpeg is needed. Every failure becomes a `MediaError` that names the file and says why.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from loguru import logger

from musetalk.config import AUDIO_SAMPLE_RATE, VIDEO_FPS
from musetalk.errors import MediaError


@dataclass(frozen=True)
class VideoInfo:
    source_fps: float
    source_size: tuple[int, int]  # (width, height) as stored
    size: tuple[int, int]  # (width, height) of the frames handed out
    duration: float
    frame_count: int


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise MediaError(f"{path} does not exist.")
    if not path.is_file():
        raise MediaError(f"{path} is not a file.")
    if path.stat().st_size == 0:
        raise MediaError(f"{path} is empty (0 bytes).")


def _scale_filter(max_side: int) -> str:
    """Keep native size unless the long side exceeds `max_side`; then shrink to fit (even sizes).

    An odd native width or height loses its last column or row (a crop, not a resample):
    H.264 and WebRTC encoders need even sizes.
    """
    big = f"gt(max(iw,ih),{max_side})"
    w = f"if({big},if(gte(iw,ih),{max_side // 2 * 2},-2),iw)"
    h = f"if({big},if(gte(iw,ih),-2,{max_side // 2 * 2}),ih)"
    return f"scale=w='{w}':h='{h}',crop=trunc(iw/2)*2:trunc(ih/2)*2:0:0"


def read_video(
    path: str | Path,
    *,
    fps: int = VIDEO_FPS,
    max_side: int = 1920,
    max_seconds: float | None = None,
) -> tuple[list[np.ndarray], VideoInfo]:
    """Decode a video to RGB frames at a constant `fps` (variable-rate input is resampled).

    Rotation metadata (phone videos) is applied; frames keep their native size unless the
    long side exceeds `max_side`, then they are scaled down to it. Returns `(frames, info)`,
    frames being `(H, W, 3) uint8`.
    """
    path = Path(path)
    _check_readable(path)
    vf = f"fps={fps},{_scale_filter(max_side)}"
    output_params = ["-vf", vf]
    if max_seconds is not None:
        output_params += ["-t", f"{max_seconds:.3f}"]
    try:
        reader = imageio_ffmpeg.read_frames(str(path), output_params=output_params)
        meta = reader.__next__()
    except (RuntimeError, IndexError, OSError, StopIteration) as exc:
        raise MediaError(_explain_decode_failure(path, exc)) from exc
    width, height = meta["size"]
    frames: list[np.ndarray] = []
    try:
        for raw in reader:
            frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3).copy())
    except (RuntimeError, OSError, ValueError) as exc:
        raise MediaError(f"{path} could not be decoded completely ({exc}). Re-encode it or use another file.") from exc
    finally:
        reader.close()
    if not frames:
        raise MediaError(f"{path} has a video stream but no frame could be decoded. Re-encode it or use another file.")
    info = VideoInfo(
        source_fps=float(meta.get("fps") or 0.0),
        source_size=tuple(meta.get("source_size", (width, height))),
        size=(width, height),
        duration=float(meta.get("duration") or len(frames) / fps),
        frame_count=len(frames),
    )
    if info.source_size != info.size:
        logger.info("{}: frames scaled from {} to {}", path.name, info.source_size, info.size)
    return frames, info


def _explain_decode_failure(path: Path, exc: BaseException) -> str:
    text = str(exc)
    if "Video: " not in text and ("Audio: " in text or isinstance(exc, IndexError)):
        return f"{path} has no video stream (is it an audio file?). Upload a video of a person's face."
    if "Invalid data found" in text or "moov atom not found" in text or "End of file" in text:
        return f"{path} is not a readable video (corrupt or truncated file)."
    return f"{path} could not be opened as a video: {' '.join(text.split())[:300]}"


def load_audio(path: str | Path, *, sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """Decode any audio (or the audio track of a video) to mono float32 at `sample_rate`.

    As the official loader (librosa): samples as float32 at the file's own rate, the mean of
    the channels, then resampled with soxr high quality. Files libsndfile reads (wav, flac,
    ogg, mp3, ...) are read directly; others (m4a, video containers) are first decoded by
    ffmpeg to a float WAV with the same channels and rate. Returns `(num_samples,) float32`.
    """
    import soundfile as sf
    import soxr

    path = Path(path)
    _check_readable(path)
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        samples, rate = _decode_with_ffmpeg(path)
    if samples.size == 0:
        raise MediaError(f"{path} has no audio samples. Use a speech recording (wav, mp3, m4a, ...).")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _decode_with_ffmpeg(path: Path) -> tuple[np.ndarray, int]:
    """Any container -> (samples (n, channels) float32, sample rate), channels and rate kept."""
    import tempfile

    import soundfile as sf

    with tempfile.TemporaryDirectory(prefix="musetalk-audio-") as tmp:
        wav = Path(tmp) / "audio.wav"
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path),
            "-vn", "-c:a", "pcm_f32le", "-f", "wav", str(wav),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, check=False)
        err = proc.stderr.decode(errors="replace")
        if proc.returncode != 0:
            if (
                "does not contain any stream" in err
                or "Output file #0 does not contain" in err
                or "matches no streams" in err
            ):
                raise MediaError(f"{path} has no audio stream. Use a speech recording (wav, mp3, m4a, ...).")
            if "Invalid data found" in err or "moov atom not found" in err:
                raise MediaError(f"{path} is not readable audio (corrupt file or unknown format).")
            raise MediaError(f"{path} is not readable audio: {' '.join(err.split())[:300]}")
        try:
            return sf.read(str(wav), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise MediaError(
                f"{path} has no audio samples ({exc}). Use a speech recording (wav, mp3, m4a, ...)."
            ) from exc


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int = AUDIO_SAMPLE_RATE) -> Path:
    """Write mono float audio as 16-bit PCM WAV (used to mux exactly the audio we lip-synced)."""
    import wave

    path = Path(path)
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return path


def write_mp4(
    path: str | Path,
    frames: Iterator[np.ndarray],
    *,
    frame_count: int,
    size: tuple[int, int],
    audio_path: str | Path,
    fps: int = VIDEO_FPS,
    on_frame: Callable[[int], None] | None = None,
) -> Path:
    """Stream frames into an H.264 + AAC mp4 with moviepy, never holding the clip in memory.

    `frames` must yield exactly `frame_count` `(H, W, 3) uint8` frames in order; moviepy
    asks for them by time, sequentially, so a running generator is enough.
    """
    from moviepy import AudioFileClip, VideoClip

    path = Path(path)
    source = _SequentialFrames(frames, frame_count, fps, on_frame)
    duration = frame_count / fps
    clip = VideoClip(frame_function=source.frame_at, duration=duration)
    audio = AudioFileClip(str(audio_path))
    try:
        if audio.duration > duration:
            audio = audio.subclipped(0, duration)
        clip = clip.with_audio(audio)
        tmp = path.with_name(f".{path.stem}.partial{path.suffix or '.mp4'}")
        clip.write_videofile(
            str(tmp), fps=fps, codec="libx264", audio_codec="aac", preset="veryfast",
            ffmpeg_params=["-pix_fmt", "yuv420p"], logger=None,
        )  # fmt: skip
        tmp.replace(path)
    finally:
        audio.close()
        clip.close()
    if source.size_seen is not None and source.size_seen != (size[1], size[0]):
        raise MediaError(f"frames had size {source.size_seen}, expected {size}")
    return path


class _SequentialFrames:
    """Adapts an in-order frame generator to moviepy's `frame_function(t)`."""

    def __init__(self, frames: Iterator[np.ndarray], count: int, fps: int, on_frame: Callable[[int], None] | None):
        self._frames = iter(frames)
        self._count = count
        self._fps = fps
        self._index = -1
        self._current: np.ndarray | None = None
        self._on_frame = on_frame
        self.size_seen: tuple[int, int] | None = None

    def frame_at(self, t: float) -> np.ndarray:
        wanted = min(int(round(t * self._fps)), self._count - 1)
        while self._index < wanted:
            self._current = next(self._frames)
            self._index += 1
            self.size_seen = self._current.shape[:2]
            if self._on_frame is not None:
                self._on_frame(self._index + 1)
        assert self._current is not None
        return self._current


def probe_duration(path: str | Path) -> float:
    """Container duration in seconds as ffprobe-free ffmpeg reports it (used by tests and render checks)."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-i", str(path)]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    text = proc.stderr.decode(errors="replace")
    for line in text.splitlines():
        if "Duration:" in line:
            hms = line.split("Duration:")[1].split(",")[0].strip()
            h, m, s = hms.split(":")
            return int(h) * 3600 + int(m) * 60 + float(s)
    raise MediaError(f"cannot read the duration of {path}")
