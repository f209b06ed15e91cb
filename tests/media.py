"""Real test media made on the fly: face and non-face videos, speech, broken files.

Plain functions, no pytest fixtures: call them from a fixture with ``tmp_path``. Every
generator writes the file at ``path`` (parent folders are created), returns it as a Path,
is deterministic and takes well under a few seconds on 2 cores (4K: keep ``seconds`` short).

Sources with clear licences: ``skimage.data.astronaut()`` (NASA, public domain) for faces,
``chelsea()`` (a cat) and ``coffee()`` for non-faces, ``espeak-ng`` for speech (needs the
Debian packages ``espeak-ng``; video goes through imageio-ffmpeg's bundled ffmpeg).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import cv2
import numpy as np

DEFAULT_TEXT = "Hello, I am your digital assistant. How can I help you today?"
_FACE_CENTRE = (224.0, 128.0)  # astronaut face centre in the 512x512 source (x, y)


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _prepare(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _even(n: float) -> int:
    """Nearest even integer >= 2: H.264 with yuv420p needs even sides."""
    return max(2, int(round(n / 2)) * 2)


def _image(image: np.ndarray | str) -> np.ndarray:
    """Accept an (H, W, 3) uint8 array or the name of a skimage.data image."""
    if isinstance(image, str):
        import skimage.data

        image = getattr(skimage.data, image)()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3].astype(np.uint8))


def _write_mp4(path: Path, frames: list[np.ndarray], fps: float) -> Path:
    """Constant-frame-rate H.264 mp4 via moviepy 2.x (bundled ffmpeg), no audio."""
    from moviepy import ImageSequenceClip

    clip = ImageSequenceClip(frames, fps=fps)
    try:
        clip.write_videofile(
            str(path),
            fps=fps,
            codec="libx264",
            audio=False,
            logger=None,
            preset="ultrafast",
            threads=2,
            pixel_format="yuv420p",
        )
    finally:
        clip.close()
    return path


def _write_vfr_mp4(path: Path, frames: list[np.ndarray], fps: float) -> Path:
    """Variable-frame-rate H.264 mp4: frame times wobble around the nominal rate.

    Frame n is shown at ``n / fps + 0.35 / fps * sin(n)``; consecutive differences stay
    positive, so the timestamps are valid but uneven (what phone recordings look like).
    """
    h, w = frames[0].shape[:2]
    pts = f"(N/{fps}+{0.35 / fps:.6f}*sin(N))/TB"
    cmd = [
        _ffmpeg(),
        "-y",
        "-loglevel",
        "error",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-s",
        f"{w}x{h}",
        "-r",
        str(fps),
        "-i",
        "pipe:0",
        "-vf",
        f"settb=1/90000,setpts={pts}",
        "-fps_mode",
        "vfr",
        "-enc_time_base",
        "1/90000",
        "-video_track_timescale",
        "90000",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        str(path),
    ]
    data = b"".join(np.ascontiguousarray(f).tobytes() for f in frames)
    proc = subprocess.run(cmd, input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed writing {path}: {proc.stderr.decode(errors='replace')}")
    return path


def _astronaut_frame(src: np.ndarray, t: float, out_w: int, out_h: int) -> np.ndarray:
    """One frame: a window of the output's aspect ratio that drifts and zooms gently."""
    sh, sw = src.shape[:2]
    aspect = out_w / out_h
    # largest window of this aspect inside the source, then zoomed in by 8-16 %
    base_w, base_h = (sw, sw / aspect) if aspect >= sw / sh else (sh * aspect, sh)
    zoom = 0.88 - 0.04 * math.sin(2 * math.pi * t / 1.7)
    win_w, win_h = base_w * zoom, base_h * zoom
    cx = _FACE_CENTRE[0] + 10 * math.sin(2 * math.pi * t / 2.0)
    cy = _FACE_CENTRE[1] + 20 + 6 * math.sin(2 * math.pi * t / 1.3)
    x0 = min(max(cx - win_w / 2, 0.0), sw - win_w)
    y0 = min(max(cy - win_h / 2, 0.0), sh - win_h)
    # sub-pixel crop + resize in one affine warp
    sx, sy = out_w / win_w, out_h / win_h
    warp = np.array([[sx, 0, -x0 * sx], [0, sy, -y0 * sy]], dtype=np.float64)
    interp = cv2.INTER_AREA if sx < 1 else cv2.INTER_LINEAR
    return cv2.warpAffine(src, warp, (out_w, out_h), flags=interp, borderMode=cv2.BORDER_REFLECT)


def astronaut_video(
    path: str | Path,
    seconds: float = 2.0,
    fps: float = 25,
    size: tuple[int, int] | None = None,
    vertical: bool = False,
    vfr: bool = False,
) -> Path:
    """Talking-head style mp4 of the astronaut: gentle drift and zoom, face always in view.

    ``size`` is (width, height) (e.g. (3840, 2160) for 4K); default 512x512, or 720x1280
    when ``vertical``. ``vfr`` writes uneven frame timestamps around ``fps``.
    """
    import skimage.data

    path = _prepare(path)
    if size is None:
        size = (720, 1280) if vertical else (512, 512)
    out_w, out_h = _even(size[0]), _even(size[1])
    src = skimage.data.astronaut()
    n = max(1, int(round(seconds * fps)))
    frames = [_astronaut_frame(src, i / fps, out_w, out_h) for i in range(n)]
    return _write_vfr_mp4(path, frames, fps) if vfr else _write_mp4(path, frames, fps)


def still_video(path: str | Path, image: np.ndarray | str, seconds: float = 1.0, fps: float = 25) -> Path:
    """A still image held for ``seconds`` (e.g. ``"chelsea"`` or ``"coffee"`` for no-face videos)."""
    path = _prepare(path)
    img = _image(image)
    h, w = img.shape[:2]
    img = np.ascontiguousarray(img[: h - h % 2, : w - w % 2])
    n = max(1, int(round(seconds * fps)))
    return _write_mp4(path, [img] * n, fps)


def two_faces_frame() -> np.ndarray:
    """(448, 800, 3) uint8: a large astronaut face on the left, a smaller one on the right."""
    import skimage.data

    face = skimage.data.astronaut()[0:300, 74:374]  # 300x300 around the head
    canvas = np.full((448, 800, 3), 128, dtype=np.uint8)
    big = cv2.resize(face, (420, 420), interpolation=cv2.INTER_LINEAR)
    small = cv2.resize(face, (220, 220), interpolation=cv2.INTER_AREA)
    canvas[14:434, 10:430] = big
    canvas[114:334, 520:740] = small
    return canvas


def two_faces_video(path: str | Path, seconds: float = 1.0, fps: float = 25) -> Path:
    """Two astronaut faces of different sizes side by side (the larger one on the left)."""
    path = _prepare(path)
    n = max(1, int(round(seconds * fps)))
    return _write_mp4(path, [two_faces_frame()] * n, fps)


def _run_ffmpeg_audio(src: Path, dst: Path, rate: int, channels: int, extra: list[str]) -> None:
    cmd = [
        _ffmpeg(),
        "-y",
        "-loglevel",
        "error",
        "-i",
        str(src),
        "-vn",
        "-ar",
        str(rate),
        "-ac",
        str(channels),
        *extra,
        "-map_metadata",
        "-1",
        str(dst),
    ]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed writing {dst}: {proc.stderr.decode(errors='replace')}")


def _espeak(text: str, dst: Path) -> None:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed: apt-get install -y espeak-ng")
    subprocess.run([exe, "-v", "en-us", "-s", "160", "-w", str(dst), text], check=True, capture_output=True)


def speech_wav(path: str | Path, text: str = DEFAULT_TEXT, rate: int = 16000, stereo: bool = False) -> Path:
    """Spoken ``text`` (espeak-ng, US English) as 16-bit PCM WAV at ``rate``, mono or stereo."""
    path = _prepare(path)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "espeak.wav"
        _espeak(text, raw)
        _run_ffmpeg_audio(raw, path, rate, 2 if stereo else 1, ["-c:a", "pcm_s16le", "-f", "wav"])
    return path


def silence_wav(path: str | Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    """Digital silence as 16-bit mono PCM WAV."""
    path = _prepare(path)
    with wave.open(str(path), "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(rate)
        wf.writeframes(b"\x00\x00" * int(round(seconds * rate)))
    return path


def audio_only_file(path: str | Path, text: str = DEFAULT_TEXT) -> Path:
    """Speech with no video stream; the format follows the suffix (.m4a AAC, .mp3, .ogg ...)."""
    path = _prepare(path)
    codec = {
        ".m4a": ["-c:a", "aac", "-b:a", "64k"],
        ".mp4": ["-c:a", "aac", "-b:a", "64k"],
        ".mp3": ["-c:a", "libmp3lame", "-b:a", "64k"],
    }.get(path.suffix.lower(), [])
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "espeak.wav"
        _espeak(text, raw)
        _run_ffmpeg_audio(raw, path, 44100, 1, codec)
    return path


def corrupt_file(path: str | Path, size: int = 64 * 1024, seed: int = 0) -> Path:
    """Random bytes under a video name (e.g. ``bad.mp4``): no container can parse it."""
    path = _prepare(path)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def empty_file(path: str | Path) -> Path:
    """A zero-byte file."""
    path = _prepare(path)
    path.write_bytes(b"")
    return path
