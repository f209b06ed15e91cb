#!/usr/bin/env python
"""MuseTalk Live control panel (Gradio): prepare avatars, run the live bot, render clips.

    python app.py [--host 127.0.0.1] [--port 7860] [--share] [--auth user:password]
                  [--models-dir models] [--avatars-dir avatars]

Layout and callbacks only; the engine (`musetalk/`) does the work. One copy of the models
is loaded in the background at start and shared by preview, preparation, render and the
live bot. Every action has a stable API name (`preview`, `prepare`, `list_avatars`, ...;
see README, "Control panel"), so `gradio_client` can drive the panel. Operator errors
(`MuseTalkError`) become `gr.Error` messages, never tracebacks.
"""

from __future__ import annotations

import argparse
import functools
import html
import importlib.metadata
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gradio as gr
import pandas as pd
import torch
from loguru import logger
from PIL import Image

import musetalk
from musetalk.avatar.prepare import PreparationCancelled, prepare_avatar
from musetalk.avatar.preview import preview_video
from musetalk.avatar.store import AvatarManifest, AvatarStore, validate_name
from musetalk.bot.runner import BotRunner, BotStatus
from musetalk.bot.transports import DAILY_URL_EXAMPLE, DEFAULT_PORT, TransportSettings
from musetalk.config import (
    FETCH_COMMAND,
    ModelPaths,
    PrepareSettings,
    RuntimeSettings,
    avatars_dir_from_env,
    models_dir_from_env,
    runtime_from_env,
)
from musetalk.errors import AvatarError, ConfigError, MediaError, MuseTalkError
from musetalk.models import Models, check_weights, load_models, resolve_runtime
from musetalk.render import render

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PANEL_PORT = 7860
HISTORY_SECONDS = 300  # the live plots show the last 5 minutes
SOURCES_DIR = ".sources"  # inside the avatars folder: kept copies of uploaded videos (re-prepare)
STATUS_EVERY_S = 1.0
PROGRESS = gr.Progress()  # a marker: Gradio gives each call its own tracker in its place

SPEECH_MODE_HELP = (
    "Speech mode lip-syncs the audio of a TTS service (the avatar speaks an LLM's answers). "
    "It needs a Pipecat pipeline with speech-to-text, an LLM and a TTS service, built in code: "
    'put `MuseTalkProcessor(models=..., avatar=..., settings=LiveSettings(mode="speech"))` after '
    "your TTS service, before `transport.output()` (see `musetalk/bot/pipeline.py`). No TTS pipeline "
    "is configured in this panel: use Mirror mode here (the avatar lip-syncs whoever speaks in the "
    "room or on the local page)."
)
WEIGHT_PARTS = (
    # (label, folder inside the models dir, required)
    ("MuseTalk v1.5 UNet", "musetalkV15", True),
    ("SD VAE (ft-mse)", "sd-vae", True),
    ("Whisper tiny (audio features)", "whisper", True),
    ("Face detector + landmarks", "face-landmarks", True),
    ("BiSeNet face parsing (optional: jaw mask)", "face-parse-bisent", False),
)
CSS = """
.toast-text, .toast-body { white-space: pre-line; }
#bot-status table { margin-top: .4rem; }
"""


# ---------------------------------------------------------------------------------------
# Panel state: the shared models, the avatar store, the bot runner, the live history.
# ---------------------------------------------------------------------------------------
class Engine:
    """What the panel shares between browser sessions and API callers (one per process).

    Models load once, in a background thread (`start_loading`); every action waits for
    them, and when they are missing it says which files and how to fetch them. A failed
    load is retried at the next action, so fetching the weights needs no restart.
    """

    def __init__(self, models_dir: Path, avatars_dir: Path, runtime: RuntimeSettings, *, speech_pipeline: bool = False):
        self.paths = ModelPaths(Path(models_dir))
        self.store = AvatarStore(Path(avatars_dir))
        self.runtime = runtime
        self.speech_pipeline = speech_pipeline  # no TTS pipeline can be configured from the panel yet
        self.sources_dir = self.store.root / SOURCES_DIR
        self.render_dir = Path(tempfile.mkdtemp(prefix="musetalk-renders-"))
        self._cond = threading.Condition()
        self._state = "idle"  # idle | loading | ready | error
        self._models: Models | None = None
        self._error: str | None = None
        self._runner: BotRunner | None = None
        self._cancel: threading.Event | None = None
        self._active_sources: set[Path] = set()
        self._history: deque[tuple[float, float | None, float | None]] = deque(
            maxlen=int(HISTORY_SECONDS / STATUS_EVERY_S)
        )
        self._last_sample = 0.0

    # ---------------------------------------------------------------- models
    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="musetalk-model-loader", daemon=True).start()

    def _load(self) -> None:
        with self._cond:
            if self._state in ("loading", "ready"):
                return
            self._state = "loading"
        models, error = None, None
        try:
            models = load_models(self.paths, self.runtime)
        except MuseTalkError as exc:
            error = str(exc)
        except Exception as exc:  # a bug or a broken install: say so, keep the panel alive
            logger.opt(exception=exc).error("Loading the models failed")
            error = f"Loading the models failed ({type(exc).__name__}: {exc}). The panel's console has the details."
        with self._cond:
            self._models, self._error = models, error
            self._state = "ready" if models is not None else "error"
            self._cond.notify_all()
        if error:
            logger.warning("Models not loaded: {}", error)
        else:
            logger.info("Models ready ({})", models.describe())

    def models(self, on_wait: Callable[[], None] | None = None) -> Models:
        """The loaded models; waits while they load; retries a failed load (weights may have been fetched since)."""
        with self._cond:
            loading = self._state == "loading"
        if loading and on_wait is not None:
            on_wait()
        with self._cond:
            while self._state == "loading":
                self._cond.wait()
            if self._state == "ready":
                return self._models
        self._load()
        with self._cond:
            while self._state == "loading":
                self._cond.wait()
            if self._state == "ready":
                return self._models
            raise MuseTalkError(self._error or "The models are not loaded.")

    def model_state(self) -> tuple[str, str | None]:
        with self._cond:
            detail = self._models.describe() if self._models is not None else self._error
            return self._state, detail

    # ---------------------------------------------------------------- bot
    def runner(self, on_wait: Callable[[], None] | None = None) -> BotRunner:
        models = self.models(on_wait)
        with self._cond:
            if self._runner is None:
                self._runner = BotRunner(models)
            return self._runner

    def existing_runner(self) -> BotRunner | None:
        with self._cond:
            return self._runner

    def bot_status(self) -> BotStatus:
        runner = self.existing_runner()
        status = runner.status() if runner is not None else BotStatus()
        self._sample(status)
        return status

    def _sample(self, status: BotStatus) -> None:
        """Keep about one (uptime, fps, latency) point per second while the bot runs."""
        if status.state != "running":
            return
        now = time.monotonic()
        with self._cond:
            if now - self._last_sample < STATUS_EVERY_S * 0.9:
                return
            self._last_sample = now
            self._history.append((status.uptime_s, status.fps, status.mouth_latency_ms))

    def history(self) -> list[tuple[float, float | None, float | None]]:
        with self._cond:
            return list(self._history)

    def clear_history(self) -> None:
        with self._cond:
            self._history.clear()
            self._last_sample = 0.0

    def shutdown(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
        runner = self.existing_runner()
        if runner is not None:
            runner.stop()
        shutil.rmtree(self.render_dir, ignore_errors=True)

    def new_render_path(self, avatar: str) -> Path:
        """Where the next render goes; renders older than an hour are removed (Gradio keeps its own copy)."""
        cutoff = time.time() - 3600
        for old in self.render_dir.glob("*.mp4"):
            if old.stat().st_mtime < cutoff:
                old.unlink(missing_ok=True)
        return self.render_dir / f"{avatar}-{time.strftime('%Y%m%d-%H%M%S')}.mp4"

    # ---------------------------------------------------------------- preparation
    def new_cancel(self) -> threading.Event:
        self._cancel = threading.Event()
        return self._cancel

    def cancel_preparation(self) -> bool:
        event = self._cancel
        if event is None or event.is_set():
            return False
        event.set()
        return True

    def keep_source(self, video: Path, name: str) -> Path:
        """A copy of an uploaded video beside the avatars, so re-preparing works after the upload is gone."""
        video = Path(video)
        if video.parent.resolve() == self.sources_dir.resolve():
            kept = video
        else:
            self.sources_dir.mkdir(parents=True, exist_ok=True)
            kept = self.sources_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}{video.suffix.lower() or '.mp4'}"
            shutil.copyfile(video, kept)
        with self._cond:
            self._active_sources.add(kept.resolve())
        return kept

    def release_source(self, kept: Path) -> None:
        with self._cond:
            self._active_sources.discard(kept.resolve())
        self.prune_sources()

    def prune_sources(self) -> None:
        """Delete kept videos that no avatar refers to any more (and no preparation is using)."""
        if not self.sources_dir.is_dir():
            return
        used = {Path(m.source_video).resolve() for m in self.store.list()}
        with self._cond:
            used |= self._active_sources
        for path in self.sources_dir.iterdir():
            if path.is_file() and path.resolve() not in used:
                path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# Helpers: errors, formatting
# ---------------------------------------------------------------------------------------
def _message(text: str) -> str:
    """Operator text for a gr.Error (rendered as HTML in the browser: escape it, keep line breaks)."""
    return html.escape(text.strip(), quote=False)


def operator_errors(fn: Callable) -> Callable:
    """Turn `MuseTalkError` into `gr.Error` with its message; anything else into a short readable error."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except MuseTalkError as exc:
            logger.warning("{}: {}", fn.__name__, exc)
            text = str(exc)
            raise gr.Error(_message(text), duration=_duration_for(text), print_exception=False) from None
        except Exception as exc:  # a bug: log the traceback here, show one line there
            logger.opt(exception=exc).error("Unexpected error in {}", fn.__name__)
            raise gr.Error(
                _message(f"Unexpected error ({type(exc).__name__}: {exc}). The panel's console has the details."),
                duration=None,
                print_exception=False,
            ) from None

    return wrapper


def _duration_for(text: str) -> float | None:
    """Short messages fade after a while; long ones (lists of missing files, how-tos) stay until closed."""
    return None if len(text) > 160 or "\n" in text.strip() else 12


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _settings(bbox_shift: float, extra_margin: float, parsing_mode: str, cheek_width: float) -> PrepareSettings:
    return PrepareSettings(
        bbox_shift=int(bbox_shift),
        extra_margin=int(extra_margin),
        parsing_mode=parsing_mode,
        cheek_width=int(cheek_width),
    )


def _video_path(video: Any) -> Path:
    if isinstance(video, dict):  # a gr.Video payload passed through as a dict
        video = video.get("video") or video.get("path")
    if not video:
        raise MediaError("Upload a video of one person facing the camera first (a few seconds to a minute).")
    return Path(video)


def manifest_dict(manifest: AvatarManifest) -> dict[str, Any]:
    """A manifest as JSON-able data, plus whether its source video still exists."""
    data = asdict(manifest)
    data["frame_size"] = list(manifest.frame_size)
    data["seconds"] = round(manifest.frame_count / manifest.fps, 2) if manifest.fps else None
    data["source_exists"] = bool(manifest.source_video) and Path(manifest.source_video).is_file()
    return data


def manifest_markdown(m: dict[str, Any]) -> str:
    prep = m.get("preparation", {})
    width, height = m["frame_size"]
    rows = [
        ("Frames", f"{m['frame_count']} at {m['fps']} fps ({m['seconds']} s, played as a {m['cycle']} loop)"),
        ("Size", f"{width} × {height}"),
        ("bbox_shift", f"{prep.get('bbox_shift')} (range measured on this clip: {prep.get('bbox_shift_range')})"),
        ("extra_margin", prep.get("extra_margin")),
        (
            "Mask",
            f"{prep.get('parsing_mode')} asked, {prep.get('mask_mode_used')} used; cheek width {prep.get('cheek_width')}",
        ),
        ("Frames without a face", len(prep.get("frames_without_face", [])) or "none"),
        ("Disk", _bytes(m["disk_bytes"])),
        ("Created", m["created"]),
        (
            "Source video",
            f"`{m['source_video']}`" + ("" if m["source_exists"] else " (gone: re-prepare needs the video again)"),
        ),
        ("Prepared with", prep.get("models", "?")),
    ]
    text = f"#### {m['name']}\n\n| Property | Value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if m.get("notes"):
        text += "\n\n" + "\n".join(f"- {note}" for note in m["notes"])
    return text


def suggest_name(video: str | None, current: str, taken: list[str]) -> str:
    """An avatar name from the file name (letters, digits, '_' and '-'), not already taken."""
    if current and current.strip():
        return current
    if not video:
        return current
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(video).stem).strip("_-") or "avatar"
    stem = stem[:56]
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}-{n}", n + 1
    return name


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


# ---------------------------------------------------------------------------------------
# The panel
# ---------------------------------------------------------------------------------------
def build_ui(engine: Engine, *, on_spaces: bool = False) -> gr.Blocks:
    """The Blocks app: Avatars, Live, Render and System tabs wired to `engine`."""
    store = engine.store

    def wait_models(progress: gr.Progress) -> Models:
        return engine.models(on_wait=lambda: progress(0.0, desc="Loading the models (first use after start)"))

    # ------------------------------------------------------------ API: avatars
    @operator_errors
    def preview(
        video: str, bbox_shift: float, extra_margin: float, parsing_mode: str, cheek_width: float, progress=PROGRESS
    ):
        """Preview how a video would be prepared: 4 frames across the clip, nothing is written.

        Args:
            video: the video file (one person facing the camera)
            bbox_shift: moves the mouth-mask line (red) down (+) or up (-), in pixels
            extra_margin: pixels added below the chin
            parsing_mode: blend mask: jaw, raw or polygon
            cheek_width: width of the cheek part of the jaw mask
        Returns:
            gallery: 4 images, each the annotated frame (face box green, crop box blue, mask line red, mask tinted) beside a generated frame
            summary: Markdown with the adjustable bbox_shift range, the mask used and notes
        """
        path = _video_path(video)
        settings = _settings(bbox_shift, extra_margin, parsing_mode, cheek_width)
        models = wait_models(progress)
        progress(0.2, desc="Finding the face and generating preview frames")
        result = preview_video(models, path, settings, count=4)
        gallery = [
            (f.side_by_side(), f"frame {f.index}: mask line y={f.mask_line}, face box {f.box}") for f in result.frames
        ]
        lo, hi = result.shift_range
        info = result.info
        lines = [
            f"**Adjustable bbox_shift range for this clip: {lo} … {hi}** (now {settings.bbox_shift}). "
            "Positive moves the red mask line down, negative moves it up; MuseTalk's authors found that "
            "positive values open the mouth more and negative values less.",
            f"Mask: **{result.mask_mode}**"
            + (
                f" (asked {parsing_mode}: no face-parsing weights, so the landmark polygon is used)"
                if result.mask_mode != parsing_mode
                else ""
            ),
            f"Clip: {info.source_size[0]}×{info.source_size[1]} at {info.source_fps:.2f} fps, {info.duration:.1f} s"
            + (f" → prepared at {info.size[0]}×{info.size[1]}" if info.size != info.source_size else ""),
            "Each image: left the frame with the face box (green), blend region (blue), mask line (red) and mask (tint); "
            "right one frame generated through the model with a closed mouth.",
        ]
        lines += [f"- {note}" for note in result.notes]
        return gallery, "\n\n".join(lines)

    def auto_preview(video, bbox_shift, extra_margin, parsing_mode, cheek_width, progress=PROGRESS):
        """Preview on upload or when a setting changes; silent when there is no video yet."""
        if not video:
            return gr.skip(), gr.skip()
        return preview(video, bbox_shift, extra_margin, parsing_mode, cheek_width, progress=progress)

    @operator_errors
    def prepare(
        video: str,
        name: str,
        bbox_shift: float,
        extra_margin: float,
        parsing_mode: str,
        cheek_width: float,
        replace: bool,
        progress=PROGRESS,
    ) -> dict:
        """Prepare an avatar from a video (can take minutes on CPU; `cancel_prepare` stops it).

        Args:
            video: the video file (one person facing the camera)
            name: avatar name: letters, digits, '_' and '-'
            bbox_shift: moves the mouth-mask line down (+) or up (-), in pixels
            extra_margin: pixels added below the chin
            parsing_mode: blend mask: jaw, raw or polygon
            cheek_width: width of the cheek part of the jaw mask
            replace: replace an existing avatar of this name
        Returns:
            the new avatar's manifest (frames, fps, size, parameters, disk size, created)
        """
        path = _video_path(video)
        name = validate_name((name or "").strip())
        if store.exists(name) and not replace:
            raise AvatarError(f"An avatar named {name!r} already exists: tick 'Replace' or pick another name.")
        settings = _settings(bbox_shift, extra_margin, parsing_mode, cheek_width)
        return _run_preparation(path, name, settings, progress)

    def _run_preparation(path: Path, name: str, settings: PrepareSettings, progress: gr.Progress) -> dict:
        models = wait_models(progress)
        cancel = engine.new_cancel()
        kept = engine.keep_source(path, name)
        try:
            manifest = prepare_avatar(
                models, store, kept, name, settings, progress=lambda f, msg: progress(f, desc=msg), cancel=cancel
            )
        except PreparationCancelled as exc:
            raise gr.Error(_message(str(exc)), title="Cancelled", print_exception=False) from None
        finally:
            engine.release_source(kept)
        gr.Info(f"Avatar {name!r} is ready: {manifest.frame_count} frames.")
        return manifest_dict(manifest)

    def cancel_prepare() -> str:
        """Cancel the preparation that is running (nothing is written).

        Returns:
            what happened
        """
        if engine.cancel_preparation():
            return "Cancelling: the preparation stops at the next frame; no avatar is written."
        return "No preparation is running."

    @operator_errors
    def reprepare_avatar(
        name: str,
        bbox_shift: float,
        extra_margin: float,
        parsing_mode: str,
        cheek_width: float,
        video: str | None = None,
        progress=PROGRESS,
    ) -> dict:
        """Prepare an existing avatar again with new settings, from its kept source video.

        Args:
            name: the avatar to re-prepare
            bbox_shift: moves the mouth-mask line down (+) or up (-), in pixels
            extra_margin: pixels added below the chin
            parsing_mode: blend mask: jaw, raw or polygon
            cheek_width: width of the cheek part of the jaw mask
            video: used only when the avatar's source video no longer exists
        Returns:
            the avatar's new manifest
        """
        if not name:
            raise AvatarError("Pick an avatar in the library first.")
        manifest = store.manifest(name)
        source = Path(manifest.source_video) if manifest.source_video else None
        if source is None or not source.is_file():
            if not video:
                raise MediaError(
                    f"The source video of {name!r} ({manifest.source_video}) no longer exists: upload the video "
                    "in 'Video' above, then press Re-prepare again."
                )
            source = Path(video)
        settings = _settings(bbox_shift, extra_margin, parsing_mode, cheek_width)
        return _run_preparation(source, name, settings, progress)

    def list_avatars() -> list[dict]:
        """Every prepared avatar with its manifest (frames, fps, size, parameters, disk size, created, source video).

        Returns:
            a list of manifests (JSON), sorted by name
        """
        return [manifest_dict(m) for m in store.list()]

    @operator_errors
    def rename_avatar(name: str, new_name: str) -> str:
        """Rename an avatar.

        Args:
            name: the avatar to rename
            new_name: its new name (letters, digits, '_' and '-')
        Returns:
            the new name
        """
        if not name:
            raise AvatarError("Pick an avatar in the library first.")
        new_name = validate_name((new_name or "").strip())
        store.rename(name, new_name)
        gr.Info(f"Renamed {name!r} to {new_name!r}.")
        return new_name

    @operator_errors
    def delete_avatar(name: str) -> str:
        """Delete an avatar for good (its frames, masks and latents).

        Args:
            name: the avatar to delete
        Returns:
            a confirmation
        """
        if not name:
            raise AvatarError("Pick an avatar in the library first.")
        store.delete(name)
        engine.prune_sources()
        gr.Info(f"Deleted avatar {name!r}.")
        return f"Deleted {name}."

    # ------------------------------------------------------------ API: live bot
    @operator_errors
    def start_bot(
        avatar: str,
        transport: str = "local",
        room_url: str = "",
        token: str = "",
        mode: str = "mirror",
        local_port: float = DEFAULT_PORT,
        local_host: str = DEFAULT_HOST,
        progress=PROGRESS,
    ) -> dict:
        """Start the live bot (one at a time): on a local WebRTC page, or in a Daily room.

        Args:
            avatar: a prepared avatar's name
            transport: "local" (a page on this machine, no account) or "daily"
            room_url: the Daily room URL (daily only), e.g. https://your-domain.daily.co/room-name
            token: the Daily meeting token (daily, private rooms); never shown or logged
            mode: "mirror" (lip-sync whoever speaks); "speech" needs a TTS pipeline built in code
            local_port: port of the local page (0 = any free port)
            local_host: address of the local page (127.0.0.1: this machine only)
        Returns:
            the bot status (state, url of the local page, ...)
        """
        from musetalk.bot.processor import LiveSettings  # imports pipecat: only when a bot starts

        token = (token or "").strip() or None
        try:
            if not avatar:
                raise AvatarError("Pick an avatar (prepare one in the Avatars tab first).")
            if mode == "speech" and not engine.speech_pipeline:
                raise ConfigError(SPEECH_MODE_HELP)
            if transport == "daily":
                settings = TransportSettings(kind="daily", room_url=room_url, token=token)
            else:
                port = int(local_port) if local_port is not None else DEFAULT_PORT
                settings = TransportSettings(
                    kind=transport or "local", host=(local_host or DEFAULT_HOST).strip(), port=port
                )
            live = LiveSettings(mode=mode or "mirror")
            runner = engine.runner(on_wait=lambda: progress(0.0, desc="Loading the models (first use after start)"))
            if runner.running:
                current = runner.status()
                raise MuseTalkError(f"The bot is already {current.state} (avatar {current.avatar}); stop it first.")
            progress(0.5, desc="Starting the bot")
            engine.clear_history()
            status = runner.start(avatar, settings, live, avatar_store=store)
        except MuseTalkError as exc:
            if token and token in str(exc):  # the runner scrubs its own errors; this covers the rest
                raise MuseTalkError(_scrub(str(exc), token)) from None
            raise
        return status.to_dict()

    @operator_errors
    def stop_bot() -> dict:
        """Stop the live bot (safe when it is not running).

        Returns:
            the bot status after stopping
        """
        runner = engine.existing_runner()
        if runner is None:
            return BotStatus().to_dict()
        return runner.stop().to_dict()

    def bot_status() -> dict:
        """The live bot's status: state, avatar, transport, url, mode, viewer_connected, uptime_s, fps, frames, mouth_latency_ms, realtime, warning, last_error.

        Returns:
            the status (JSON)
        """
        return engine.bot_status().to_dict()

    # ------------------------------------------------------------ API: render
    @operator_errors
    def render_clip(avatar: str, audio: str, progress=PROGRESS) -> str:
        """Lip-sync a speech file onto an avatar: an H.264 + AAC mp4 at 25 fps.

        Args:
            avatar: a prepared avatar's name
            audio: any audio file (wav, mp3, m4a; any rate, mono or stereo)
        Returns:
            the mp4
        """
        if not avatar:
            raise AvatarError("Pick an avatar (prepare one in the Avatars tab first).")
        if not audio:
            raise MediaError("Upload or record some speech first.")
        models = wait_models(progress)
        progress(0.0, desc=f"Loading avatar {avatar}")
        loaded = store.load(avatar)
        out = engine.new_render_path(avatar)
        started = time.monotonic()
        result = render(
            models,
            loaded,
            audio,
            out,
            progress=lambda done, total: progress(done / max(total, 1), desc=f"Rendering frame {done}/{total}"),
        )
        gr.Info(
            f"Rendered {result.frames} frames ({result.video_seconds:.2f} s of video for {result.audio_seconds:.2f} s of audio) "
            f"in {time.monotonic() - started:.0f} s."
        )
        return str(result.path)

    # ------------------------------------------------------------ API: system
    def system_info() -> dict:
        """Device, GPU, versions, model files present/missing and the command that fetches them, folders.

        Returns:
            the facts (JSON)
        """
        return _system_info(engine)

    @operator_errors
    def load_models_now(progress=PROGRESS) -> str:
        """Load the models now (e.g. after fetching the weights); reports what is missing otherwise.

        Returns:
            the device and precision the models run on
        """
        models = wait_models(progress)
        return f"Models ready: {models.describe()}"

    # ------------------------------------------------------------ UI-only refreshes
    def avatar_dropdown(label: str, **kwargs: Any) -> gr.Dropdown:
        # Custom values are allowed so API callers can name avatars prepared after the page was built;
        # the actions check the name and say which avatars exist.
        names = store.names()
        return gr.Dropdown(
            label=label, choices=names, value=names[0] if names else None, allow_custom_value=True, **kwargs
        )

    def avatar_choices(selected: str | None = None, fallback_first: bool = True):
        names = store.names()
        value = selected if selected in names else (names[0] if names and fallback_first else None)
        return gr.Dropdown(choices=names, value=value)

    def refresh_library(selected: str | None):
        manifests = list_avatars()
        names = [m["name"] for m in manifests]
        gallery = []
        for m in manifests:
            thumb = store.thumbnail(m["name"])
            if thumb.is_file():
                with Image.open(thumb) as img:
                    gallery.append((img.convert("RGB"), f"{m['name']} · {m['frame_count']} frames"))
        table = pd.DataFrame(
            [
                {
                    "name": m["name"],
                    "frames": m["frame_count"],
                    "seconds": m["seconds"],
                    "size": f"{m['frame_size'][0]}×{m['frame_size'][1]}",
                    "bbox_shift": m["preparation"].get("bbox_shift"),
                    "mask": m["preparation"].get("mask_mode_used"),
                    "disk": _bytes(m["disk_bytes"]),
                    "created": m["created"],
                }
                for m in manifests
            ],
            columns=["name", "frames", "seconds", "size", "bbox_shift", "mask", "disk", "created"],
        )
        value = selected if selected in names else (names[0] if names else None)
        empty = "No avatars yet: upload a video above, check the preview, then press **Prepare**."
        return (
            gallery,
            table,
            gr.Dropdown(choices=names, value=value),
            empty if not names else "",
        )

    def show_avatar(name: str | None):
        if not name:
            return "", None, gr.Row(visible=False)
        try:
            data = manifest_dict(store.manifest(name))
        except MuseTalkError as exc:
            return f"**{html.escape(str(exc))}**", None, gr.Row(visible=False)
        return manifest_markdown(data), data, gr.Row(visible=False)

    def pick_from_gallery(evt: gr.SelectData):
        caption = evt.value.get("caption") if isinstance(evt.value, dict) else None
        return caption.split(" · ")[0] if caption else gr.skip()

    @operator_errors
    def load_into_editor(name: str | None):
        if not name:
            raise AvatarError("Pick an avatar in the library first.")
        m = manifest_dict(store.manifest(name))
        prep = m["preparation"]
        video = m["source_video"] if m["source_exists"] else None
        if video is None:
            gr.Warning(f"The source video of {name!r} is gone: upload it again to preview.")
        return (
            video,
            name,
            True,
            prep.get("bbox_shift", 0),
            prep.get("extra_margin", 10),
            prep.get("parsing_mode", "jaw"),
            prep.get("cheek_width", 90),
        )

    def confirm_delete(name: str | None):
        if not name:
            raise gr.Error("Pick an avatar in the library first.", print_exception=False)
        return gr.Row(visible=True), f"Delete avatar **{name}** for good? Its frames, masks and latents are removed."

    def models_banner() -> str:
        state, detail = engine.model_state()
        if state == "ready":
            return f"**Models ready** ({detail}) · models `{engine.paths.models_dir}` · avatars `{store.root}`"
        if state in ("loading", "idle"):
            return f"**Loading the models** from `{engine.paths.models_dir}` … (actions wait for them)"
        return (
            f"**Models not loaded:** {html.escape(_model_problem(engine, detail))} See the **System** tab; fetch the "
            f"weights with `{FETCH_COMMAND}`, then press **Load models** there."
        )

    def status_view(status: dict) -> str:
        state = status["state"]
        head = f"Bot: **{state}**"
        if status.get("avatar"):
            head += f" · avatar `{status['avatar']}` · {status.get('transport')} · {status.get('mode')}"
        fps = f"{status['fps']:.1f}" if status.get("fps") is not None else "–"
        lat = f"{status['mouth_latency_ms']:.0f} ms" if status.get("mouth_latency_ms") is not None else "–"
        realtime = {True: "yes", False: "no", None: "–"}[status.get("realtime")]
        viewer = "connected" if status.get("viewer_connected") else "none"
        lines = [
            head,
            "",
            "| Uptime | FPS | Mouth latency | Frames | Real time | Viewer |",
            "|---|---|---|---|---|---|",
            f"| {_duration(status.get('uptime_s') or 0)} | {fps} | {lat} | {status.get('frames', 0):,} | {realtime} | {viewer} |",
        ]
        if status.get("warning"):
            lines.append(f"\n**Warning:** {html.escape(status['warning'])}")
        if status.get("last_error"):
            lines.append(f"\n**Last error:** {html.escape(status['last_error'])}")
        if state == "stopped" and not status.get("last_error"):
            lines.append("\nThe bot is stopped. Pick an avatar and press **Start**.")
        elif state == "running" and not status.get("viewer_connected"):
            where = (
                "open the live page below and press Start there"
                if status.get("transport") == "local"
                else "join the Daily room"
            )
            lines.append(f"\nWaiting for a viewer: {where}.")
        return "\n".join(lines)

    def page_view(status: dict) -> str:
        url = status.get("url")
        if status.get("transport") != "local" or not url or status["state"] not in ("starting", "running"):
            return ""
        safe = html.escape(url)
        port = urlsplit(url).port or DEFAULT_PORT
        return (
            f'<p><b>Live page:</b> <a href="{safe}" target="_blank" rel="noopener">{safe}</a> (opens in a new tab). '
            "Press Start there and allow the microphone; one viewer at a time. Browsers allow the microphone only "
            "on https or on localhost / 127.0.0.1, so from another machine use an SSH tunnel "
            f"(<code>ssh -L {port}:127.0.0.1:{port} user@this-machine</code>) or the Daily transport.</p>"
            f'<iframe src="{safe}" title="MuseTalk live page" allow="microphone; autoplay" '
            'style="width:100%;height:640px;border:1px solid #8884;border-radius:8px"></iframe>'
        )

    def plots():
        rows = engine.history()
        frame = pd.DataFrame(rows, columns=["uptime_s", "fps", "latency_ms"], dtype=float).round(1)
        return frame.dropna(subset=["fps"]), frame.dropna(subset=["latency_ms"])

    def refresh_live(last_url: str | None):
        status = bot_status()
        fps_frame, lat_frame = plots()
        page_key = page_view(status)
        page = gr.skip() if page_key == last_url else page_key
        return models_banner(), status_view(status), status, fps_frame, lat_frame, page, page_key

    def show_transport(kind: str):
        return gr.Group(visible=kind == "daily"), gr.Accordion(visible=kind == "local")

    def show_mode(mode: str):
        return gr.Markdown(visible=mode == "speech")

    def system_view() -> str:
        info = _system_info(engine)
        lines = [
            "| Item | Value |",
            "|---|---|",
            f"| Device | {info['device']} |",
            f"| GPU | {info['gpu'] or 'none (CUDA not available): preparation and render run slowly; the live bot cannot keep real time'} |",
            f"| Models | {info['models_state']} |",
            f"| Models folder | `{info['models_dir']}` |",
            f"| Avatars folder | `{info['avatars_dir']}` ({info['avatar_count']} avatars) |",
            "| Versions | " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + " |",
            "",
            "#### Weights",
            "",
            "| Part | Folder | State |",
            "|---|---|---|",
        ]
        for part in info["weights"]:
            state = "present" if part["present"] else ("**missing**" if part["required"] else "missing (optional)")
            lines.append(f"| {part['part']} | `{part['folder']}` | {state} |")
        if info["missing"]:
            lines += ["", "Missing or empty files:", ""] + [f"- `{p}`" for p in info["missing"]]
        if any(not part["present"] and part["required"] for part in info["weights"]):
            lines.append(
                f"\n**Fetch the weights** from the repository folder with `{info['fetch_command']}`, then press **Load models**."
            )
        else:
            lines.append(f"\nAll required weights are present (`{info['fetch_command']}` fetches any that go missing).")
        return "\n".join(lines)

    # ------------------------------------------------------------ layout
    with gr.Blocks(title="MuseTalk Live", delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown("# MuseTalk Live · control panel\nPrepare an avatar from a video, run it live, or render a clip.")
        timer = gr.Timer(STATUS_EVERY_S)  # outside the tabs: hidden tabs are not mounted, their timers would not tick
        banner = gr.Markdown(models_banner())
        live_page_key = gr.State("")

        with gr.Tabs():
            # ------------------------------------------------ Avatars
            with gr.Tab("Avatars", id="avatars") as avatars_tab:
                gr.Markdown(
                    "### 1. Preview\nUpload a few seconds to a minute of one person facing the camera, mouth closed "
                    "or talking. The preview shows how the face will be cut and blended on 4 frames across the clip; "
                    "changing a setting renders it again."
                )
                with gr.Row():
                    with gr.Column(scale=2):
                        video = gr.Video(label="Video", sources=["upload", "webcam"], include_audio=True, height=320)
                        bbox_shift = gr.Slider(
                            -50,
                            50,
                            value=0,
                            step=1,
                            label="bbox_shift (px)",
                            info="Moves the mouth-mask line (red): + down, - up. Stay inside the range shown under the preview.",
                        )
                        extra_margin = gr.Slider(
                            0,
                            100,
                            value=10,
                            step=1,
                            label="extra_margin (px)",
                            info="Added below the chin, so the jaw can move.",
                        )
                        parsing_mode = gr.Radio(
                            [("Jaw (v1.5)", "jaw"), ("Raw face parsing", "raw"), ("Landmark polygon", "polygon")],
                            value="jaw", label="Blend mask", info="Jaw and raw need the face-parsing weights; without them the polygon is used.",
                        )  # fmt: skip
                        cheek_width = gr.Slider(
                            0,
                            256,
                            value=90,
                            step=1,
                            label="Cheek width",
                            info="Width of the cheek part of the jaw mask.",
                        )
                        preview_btn = gr.Button("Preview", variant="secondary", elem_id="preview-btn")
                    with gr.Column(scale=3):
                        preview_gallery = gr.Gallery(
                            label="Preview: annotated frame | generated frame",
                            columns=2,
                            format="png",
                            object_fit="contain",
                        )
                        preview_info = gr.Markdown()

                gr.Markdown("### 2. Prepare")
                with gr.Row():
                    name = gr.Textbox(
                        label="Avatar name",
                        placeholder="e.g. anna_office",
                        info="Letters, digits, '_' and '-'.",
                        scale=3,
                    )
                    replace = gr.Checkbox(label="Replace an avatar of this name", value=False, scale=1)
                with gr.Row():
                    prepare_btn = gr.Button("Prepare", variant="primary", elem_id="prepare-btn")
                    cancel_btn = gr.Button("Cancel preparation", variant="stop", elem_id="cancel-btn")
                prepare_note = gr.Markdown(min_height=70)
                prepared = gr.JSON(label="Prepared avatar", visible=False)

                gr.Markdown("### 3. Library")
                library_empty = gr.Markdown()
                library_gallery = gr.Gallery(
                    label="Prepared avatars (click one)",
                    columns=6,
                    height=220,
                    object_fit="contain",
                    allow_preview=False,
                    fit_columns=False,
                )
                library_table = gr.Dataframe(label="All avatars", interactive=False, wrap=True)
                with gr.Row():
                    lib_select = avatar_dropdown("Selected avatar", scale=3)
                    refresh_btn = gr.Button("Refresh", scale=1, elem_id="library-refresh-btn")
                lib_details = gr.Markdown()
                with gr.Accordion("Manifest (JSON)", open=False):
                    lib_json = gr.JSON(label="Manifest")
                with gr.Row():
                    new_name = gr.Textbox(label="New name", scale=3)
                    rename_btn = gr.Button("Rename", scale=1, elem_id="rename-btn")
                with gr.Row():
                    edit_btn = gr.Button("Load into the editor above", elem_id="edit-btn")
                    reprepare_btn = gr.Button("Re-prepare with the settings above", elem_id="reprepare-btn")
                    delete_btn = gr.Button("Delete…", variant="stop", elem_id="delete-btn")
                with gr.Row(visible=False) as confirm_row:
                    confirm_text = gr.Markdown()
                    confirm_btn = gr.Button("Yes, delete it", variant="stop", elem_id="confirm-delete-btn")
                    keep_btn = gr.Button("Keep it", elem_id="keep-btn")
                avatars_json = gr.JSON(visible=False)
                renamed = gr.Textbox(visible=False)

            # ------------------------------------------------ Live
            with gr.Tab("Live", id="live") as live_tab:
                with gr.Row():
                    with gr.Column(scale=2):
                        live_avatar = avatar_dropdown("Avatar")
                        transport = gr.Radio(
                            [("Local page on this machine (no account)", "local"), ("Daily room", "daily")],
                            value="local", label="Transport",
                        )  # fmt: skip
                        with gr.Group(visible=False) as daily_group:
                            room_url = gr.Textbox(label="Daily room URL", placeholder=DAILY_URL_EXAMPLE)
                            token = gr.Textbox(
                                label="Daily token (optional, private rooms)",
                                type="password",
                                placeholder="never shown or logged",
                            )
                        with gr.Accordion("Local page address", open=False) as local_group:
                            local_host = gr.Textbox(
                                label="Host",
                                value=DEFAULT_HOST,
                                info="127.0.0.1 = this machine only (microphone allowed); 0.0.0.0 = the network (needs https or an SSH tunnel for the microphone).",
                            )
                            local_port = gr.Number(
                                label="Port",
                                value=DEFAULT_PORT,
                                precision=0,
                                minimum=0,
                                maximum=65535,
                                info="0 = any free port.",
                            )
                        mode = gr.Radio(
                            [("Mirror: lip-sync whoever speaks", "mirror"), ("Speech from a TTS pipeline", "speech")],
                            value="mirror", label="Mode",
                        )  # fmt: skip
                        speech_note = gr.Markdown(
                            ("" if engine.speech_pipeline else "**Not available here.** ") + SPEECH_MODE_HELP,
                            visible=False,
                        )
                        if on_spaces:
                            gr.Markdown(
                                "**Note:** on Hugging Face Spaces the local page is not reachable from your browser: use a Daily room."
                            )
                        with gr.Row():
                            start_btn = gr.Button("Start", variant="primary", elem_id="start-btn")
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
                    with gr.Column(scale=3):
                        status_md = gr.Markdown(status_view(BotStatus().to_dict()), elem_id="bot-status")
                        with gr.Row():
                            fps_plot = gr.LinePlot(
                                pd.DataFrame(columns=["uptime_s", "fps"], dtype=float),
                                x="uptime_s",
                                y="fps",
                                y_lim=[0, 30],
                                title="Frames per second",
                                x_title="bot uptime (s)",
                                y_title="fps",
                                height=200,
                            )
                            lat_plot = gr.LinePlot(
                                pd.DataFrame(columns=["uptime_s", "latency_ms"], dtype=float),
                                x="uptime_s",
                                y="latency_ms",
                                title="Mouth latency",
                                x_title="bot uptime (s)",
                                y_title="ms",
                                height=200,
                            )
                        with gr.Accordion("Status (JSON)", open=False):
                            status_json = gr.JSON(label="Status")
                page_html = gr.HTML()

            # ------------------------------------------------ Render
            with gr.Tab("Render", id="render") as render_tab:
                gr.Markdown("Lip-sync a speech file onto an avatar and download the mp4 (25 fps, H.264 + AAC).")
                with gr.Row():
                    with gr.Column():
                        render_avatar = avatar_dropdown("Avatar")
                        audio = gr.Audio(label="Speech", sources=["upload", "microphone"], type="filepath")
                        render_btn = gr.Button("Render", variant="primary", elem_id="render-btn")
                    with gr.Column():
                        render_video = gr.Video(label="Lip-synced video", interactive=False, height=480)

            # ------------------------------------------------ System
            with gr.Tab("System", id="system") as system_tab:
                system_md = gr.Markdown()
                with gr.Row():
                    system_btn = gr.Button("Refresh", elem_id="system-refresh-btn")
                    load_btn = gr.Button("Load models", variant="primary", elem_id="load-models-btn")
                load_note = gr.Markdown()

        # ------------------------------------------------------------ events
        settings_in = [video, bbox_shift, extra_margin, parsing_mode, cheek_width]
        library_out = [library_gallery, library_table, lib_select, library_empty]
        dropdowns = [live_avatar, render_avatar]

        def refresh_dropdowns(live_value, render_value):
            return avatar_choices(live_value), avatar_choices(render_value)

        preview_btn.click(
            preview, settings_in, [preview_gallery, preview_info],
            api_name="preview", concurrency_id="preview", concurrency_limit=1,
        )  # fmt: skip
        gr.on(
            [video.upload, bbox_shift.release, extra_margin.release, cheek_width.release, parsing_mode.input],
            auto_preview, settings_in, [preview_gallery, preview_info],
            api_visibility="private", concurrency_id="preview", concurrency_limit=1, trigger_mode="always_last",
        )  # fmt: skip
        video.upload(
            lambda v, n: suggest_name(v, n, store.names()), [video, name], name, api_visibility="private", queue=False
        )

        def after_prepare(manifest: dict, live_value: str | None, render_value: str | None):
            note = f"Avatar **{manifest['name']}** is ready ({manifest['frame_count']} frames). Run it in the **Live** tab."
            live = live_value if live_value in store.names() else manifest["name"]
            render_pick = render_value if render_value in store.names() else manifest["name"]
            return (note, *refresh_library(manifest["name"]), *refresh_dropdowns(live, render_pick))

        prepare_btn.click(
            prepare, [video, name, bbox_shift, extra_margin, parsing_mode, cheek_width, replace], prepared,
            api_name="prepare", concurrency_id="prepare", concurrency_limit=1, show_progress_on=prepare_note,
        ).success(after_prepare, [prepared, *dropdowns], [prepare_note, *library_out, *dropdowns], api_visibility="private")  # fmt: skip
        cancel_btn.click(
            cancel_prepare, None, prepare_note, api_name="cancel_prepare", concurrency_limit=None, queue=False
        )

        refresh_btn.click(list_avatars, None, avatars_json, api_name="list_avatars", concurrency_limit=None).then(
            refresh_library, lib_select, library_out, api_visibility="private"
        ).then(refresh_dropdowns, dropdowns, dropdowns, api_visibility="private")
        lib_select.change(show_avatar, lib_select, [lib_details, lib_json, confirm_row], api_visibility="private")
        library_gallery.select(pick_from_gallery, None, lib_select, api_visibility="private")

        rename_btn.click(rename_avatar, [lib_select, new_name], renamed, api_name="rename_avatar").success(
            lambda n: ("", *refresh_library(n)), renamed, [new_name, *library_out], api_visibility="private"
        ).then(refresh_dropdowns, dropdowns, dropdowns, api_visibility="private")
        delete_btn.click(confirm_delete, lib_select, [confirm_row, confirm_text], api_visibility="private")
        keep_btn.click(lambda: gr.Row(visible=False), None, confirm_row, api_visibility="private")
        confirm_btn.click(delete_avatar, lib_select, prepare_note, api_name="delete_avatar").then(
            lambda: gr.Row(visible=False), None, confirm_row, api_visibility="private"
        ).then(refresh_library, lib_select, library_out, api_visibility="private").then(
            refresh_dropdowns, dropdowns, dropdowns, api_visibility="private"
        )
        edit_btn.click(
            load_into_editor, lib_select, [video, name, replace, bbox_shift, extra_margin, parsing_mode, cheek_width],
            api_visibility="private",
        ).success(auto_preview, settings_in, [preview_gallery, preview_info], api_visibility="private", concurrency_id="preview", concurrency_limit=1)  # fmt: skip
        reprepare_btn.click(
            reprepare_avatar, [lib_select, bbox_shift, extra_margin, parsing_mode, cheek_width, video], prepared,
            api_name="reprepare_avatar", concurrency_id="prepare", concurrency_limit=1, show_progress_on=prepare_note,
        ).success(
            lambda m: f"Avatar **{m['name']}** prepared again ({m['frame_count']} frames).", prepared, prepare_note,
            api_visibility="private",
        ).then(refresh_library, lib_select, library_out, api_visibility="private").then(
            show_avatar, lib_select, [lib_details, lib_json, confirm_row], api_visibility="private"
        )  # fmt: skip

        transport.change(show_transport, transport, [daily_group, local_group], api_visibility="private", queue=False)
        mode.change(show_mode, mode, speech_note, api_visibility="private", queue=False)
        start_btn.click(
            start_bot, [live_avatar, transport, room_url, token, mode, local_port, local_host], status_json,
            api_name="start_bot", concurrency_id="bot_start", concurrency_limit=1, show_progress_on=status_md,
        ).then(refresh_live, live_page_key, [banner, status_md, status_json, fps_plot, lat_plot, page_html, live_page_key], api_visibility="private")  # fmt: skip
        stop_btn.click(
            stop_bot, None, status_json, api_name="stop_bot", concurrency_limit=None, show_progress_on=status_md
        ).then(
            refresh_live,
            live_page_key,
            [banner, status_md, status_json, fps_plot, lat_plot, page_html, live_page_key],
            api_visibility="private",
        )
        timer.tick(
            refresh_live, live_page_key, [banner, status_md, status_json, fps_plot, lat_plot, page_html, live_page_key],
            api_visibility="private", concurrency_limit=None, show_progress="hidden",
        )  # fmt: skip
        gr.api(bot_status, api_name="bot_status", concurrency_limit=None)

        render_btn.click(
            render_clip,
            [render_avatar, audio],
            render_video,
            api_name="render",
            concurrency_id="render",
            concurrency_limit=1,
        )

        system_tab.select(system_view, None, system_md, api_visibility="private")
        system_btn.click(system_view, None, system_md, api_visibility="private")
        load_btn.click(load_models_now, None, load_note, api_name="load_models", concurrency_id="load_models").then(
            system_view, None, system_md, api_visibility="private"
        ).then(models_banner, None, banner, api_visibility="private")
        gr.api(system_info, api_name="system_info", concurrency_limit=None)

        for tab in (avatars_tab, live_tab, render_tab):
            tab.select(refresh_dropdowns, dropdowns, dropdowns, api_visibility="private", queue=False)
        demo.load(refresh_library, lib_select, library_out, api_visibility="private").then(
            refresh_dropdowns, dropdowns, dropdowns, api_visibility="private"
        ).then(system_view, None, system_md, api_visibility="private")
    return demo


def _model_problem(engine: Engine, error: str | None) -> str:
    """One line on why the models are not loaded."""
    missing = check_weights(engine.paths)
    if missing:
        return f"{len(missing)} required weight files are missing or empty in {engine.paths.models_dir}."
    first = (error or "unknown error").strip().splitlines()[0].rstrip(":")
    return first if first.endswith(".") else first + "."


def _system_info(engine: Engine) -> dict[str, Any]:
    try:
        device, dtype = resolve_runtime(engine.runtime)
        device_text = f"{device.type} {str(dtype).removeprefix('torch.')}"
    except ConfigError as exc:
        device_text = f"invalid: {exc}"
    gpu = None
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        gpu = f"{props.name}: {props.total_memory / 2**30:.1f} GiB"
        try:
            free, _ = torch.cuda.mem_get_info(index)
            gpu += f" ({free / 2**30:.1f} GiB free)"
        except RuntimeError:  # some drivers refuse the query; the total is enough
            pass
    missing = check_weights(engine.paths, include_optional=True)
    weights = []
    for label, folder, required in WEIGHT_PARTS:
        path = engine.paths.models_dir / folder
        present = not any(str(path) in problem for problem in missing)
        weights.append({"part": label, "folder": str(path), "required": required, "present": present})
    versions = {"python": platform.python_version(), "musetalk": musetalk.__version__, "torch": torch.__version__}
    for dist in ("pipecat-ai", "gradio", "diffusers", "transformers"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    state, detail = engine.model_state()
    return {
        "device": device_text,
        "gpu": gpu,
        "models_state": {"ready": f"ready: {detail}", "error": f"not loaded: {_model_problem(engine, detail)}"}.get(
            state, state
        ),
        "models_dir": str(engine.paths.models_dir.resolve()),
        "avatars_dir": str(engine.store.root.resolve()),
        "avatar_count": len(engine.store.names()),
        "versions": versions,
        "weights": weights,
        "missing": missing,
        "fetch_command": FETCH_COMMAND,
    }


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="MuseTalk Live control panel (Gradio): prepare avatars, run the live bot, render clips.",
    )
    parser.add_argument(
        "--host", default=None, help=f"address to serve on (default {DEFAULT_HOST}; 0.0.0.0 on Hugging Face Spaces)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help=f"port (default {DEFAULT_PANEL_PORT}, or GRADIO_SERVER_PORT)"
    )
    parser.add_argument(
        "--share", action="store_true", help="also publish a temporary public gradio.live link (needs internet)"
    )
    parser.add_argument("--auth", metavar="USER:PASSWORD", default=None, help="ask for this user name and password")
    parser.add_argument(
        "--models-dir", type=Path, default=None, help="model weights folder (default MUSETALK_MODELS_DIR or ./models)"
    )
    parser.add_argument(
        "--avatars-dir",
        type=Path,
        default=None,
        help="prepared avatars folder (default MUSETALK_AVATARS_DIR or ./avatars)",
    )
    return parser


def resolve_address(
    host: str | None, port: int | None, environ: dict[str, str] | os._Environ = os.environ
) -> tuple[str, int]:
    """Host and port: flags first, then GRADIO_SERVER_NAME/PORT; Spaces (SPACE_ID) serve on 0.0.0.0."""
    if host is None:
        host = environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if environ.get("SPACE_ID") else DEFAULT_HOST)
    if port is None:
        port = int(environ.get("GRADIO_SERVER_PORT") or DEFAULT_PANEL_PORT)
    return host, port


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth must be USER:PASSWORD, e.g. --auth admin:correct-horse")
    return user, password


def launch(
    demo: gr.Blocks,
    engine: Engine,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PANEL_PORT,
    share: bool = False,
    auth: tuple[str, str] | None = None,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
) -> None:
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        auth_message="MuseTalk Live control panel",
        allowed_paths=[str(engine.sources_dir)],
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        css=CSS,
        footer_links=["api", "settings"],
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        auth = parse_auth(args.auth)
        runtime = runtime_from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host, port = resolve_address(args.host, args.port)
    on_spaces = bool(os.environ.get("SPACE_ID"))
    if host not in ("127.0.0.1", "localhost", "::1") and auth is None and not on_spaces:
        logger.warning(
            "Serving on {} without --auth: anyone who reaches this address controls the panel and the bot.", host
        )
    engine = Engine(args.models_dir or models_dir_from_env(), args.avatars_dir or avatars_dir_from_env(), runtime)
    engine.start_loading()
    demo = build_ui(engine, on_spaces=on_spaces)
    signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`, Spaces: shut down like Ctrl-C (the bot stops cleanly)
    try:
        launch(demo, engine, host=host, port=port, share=args.share, auth=auth)
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
