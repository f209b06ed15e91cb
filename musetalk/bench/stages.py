"""Report section `stages`: what one frame costs in each stage, from audio to an encoded video frame.

* audio features: the whisper encoder (log-mel included) on one 30 s window. The file path
  amortises a window over the 750 frames it covers; the live service encodes one window per
  session and batch (the windows of a batch's sessions in one pass), so with many sessions a
  frame costs up to one window of a batched pass;
* UNet, VAE decode, blend/paste: the generation section's split at the generator's default batch;
* video encode: H.264 (libx264, veryfast, yuv420p: the render's mp4 settings) through the ffmpeg
  binary of imageio-ffmpeg or the PATH, piped raw frames; where there is no ffmpeg, OpenCV's
  MPEG-4 writer, named as such. The live bot's video is encoded by its transport instead.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from musetalk.audio import WINDOW_SAMPLES, AudioFeatureEncoder
from musetalk.bench.budget import Deadline
from musetalk.bench.context import Context
from musetalk.bench.speed import FRAMES_PER_WINDOW
from musetalk.bench.timing import timed
from musetalk.config import VIDEO_FPS
from musetalk.live.features import WindowEncoder


def _features(ctx: Context) -> dict[str, float]:
    """ms per 30 s window: alone (file path) and per window in a batched pass of the service's batch size."""
    m = ctx.models
    audio = (np.random.default_rng(ctx.settings.seed).standard_normal(WINDOW_SAMPLES) * 0.1).astype(np.float32)
    single = AudioFeatureEncoder(m.whisper, m.feature_extractor, m.device, m.dtype)
    single.encode_window(audio[:16000])  # warm-up
    one = min(timed(lambda: single.encode_window(audio), ctx.device).wall for _ in range(3))
    batch = 8 if ctx.device.type == "cuda" else 4
    windows = WindowEncoder(m)
    windows.encode([audio] * batch)  # warm-up
    batched = min(timed(lambda: windows.encode([audio] * batch), ctx.device).wall for _ in range(2))
    return {
        "window_ms": 1000 * one,
        "file_path_ms_per_frame": 1000 * one / FRAMES_PER_WINDOW,
        "live_batch": batch,
        "live_ms_per_window_batched": 1000 * batched / batch,
    }


def _ffmpeg() -> str | None:
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # not installed, or no binary for this platform
        return shutil.which("ffmpeg")


def _x264(exe: str, frames: list[np.ndarray], path: Path) -> float | None:
    """Seconds to encode `frames` with libx264 through ffmpeg (None: this ffmpeg could not)."""
    h, w = frames[0].shape[:2]
    cmd = [exe, "-nostdin", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
           "-r", str(VIDEO_FPS), "-i", "-", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(path)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for frame in frames:
            proc.stdin.write(np.ascontiguousarray(frame).tobytes())  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
    except BrokenPipeError:
        pass
    proc.wait(timeout=120)
    seconds = time.perf_counter() - start
    return seconds if proc.returncode == 0 and path.stat().st_size > 0 else None


def _opencv(frames: list[np.ndarray], path: Path) -> float:
    h, w = frames[0].shape[:2]
    start = time.perf_counter()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, (w, h))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return time.perf_counter() - start


def time_video_encode(frames: list[np.ndarray]) -> dict[str, Any]:
    h, w = frames[0].shape[:2]
    with tempfile.TemporaryDirectory(prefix="musetalk-bench-") as tmp:
        exe = _ffmpeg()
        seconds = _x264(exe, frames, Path(tmp) / "x264.mp4") if exe else None
        encoder = f"libx264 veryfast yuv420p (ffmpeg {exe})"
        if seconds is None:
            encoder = "OpenCV mp4v (MPEG-4 part 2): " + ("no ffmpeg found" if exe is None else "ffmpeg has no libx264")
            seconds = _opencv(frames, Path(tmp) / "cv.mp4")
    return {"encoder": encoder, "frames": len(frames), "size": [w, h], "ms_per_frame": 1000 * seconds / len(frames)}


def run_stages(ctx: Context, deadline: Deadline) -> dict[str, Any]:
    ctx.offline_threads()
    gen = [r for r in ctx.results.get("generation", {}).get("batches", []) if r["status"] == "ok"]
    split = min(gen, key=lambda r: abs(r["batch"] - ctx.plan.stage_batch), default=None)
    skipped = [] if split else ["UNet, VAE decode, blend: the generation section measured no batch"]
    features = _features(ctx)
    frames = [ctx.avatar.frames[ctx.avatar.frame_index(k)] for k in range(ctx.plan.encode_frames)]
    encode = time_video_encode(frames)
    ctx.log(f"stages: features {features['window_ms']:.1f} ms/window, encode {encode['ms_per_frame']:.2f} ms/frame")
    stages = {"audio_features": features["file_path_ms_per_frame"]}
    if split:
        stages.update(unet=split["unet_ms"], vae_decode=split["vae_decode_ms"], blend=split["blend_ms"])
    stages["video_encode"] = encode["ms_per_frame"]
    return {
        "batch": split["batch"] if split else None,
        "ms_per_frame": stages,
        "total_ms_per_frame": sum(stages.values()),
        "generation_fps": split["fps"] if split else None,
        "features": features,
        "video_encode": encode,
        "threads": ctx.threads,
        "skipped": skipped,
    }
