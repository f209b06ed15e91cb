"""The Render tab: lip-sync a speech file onto an avatar and download the mp4.

API name: `render`.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import gradio as gr

from musetalk.errors import AvatarError, MediaError
from musetalk.panel.avatars import AvatarActions
from musetalk.panel.boundary import PROGRESS, operator_errors
from musetalk.panel.engine import Engine
from musetalk.render import render


class RenderActions:
    """The tab's action, bound to one engine."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @operator_errors
    def render_clip(self, avatar: str, audio: str, progress=PROGRESS) -> str:
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
        models = self.engine.models(on_wait=lambda: progress(0.0, desc="Loading the models (first use after start)"))
        progress(0.0, desc=f"Loading avatar {avatar}")
        loaded = self.engine.store.load(avatar)
        out = self.engine.new_render_path(avatar)
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


def build(avatars: AvatarActions) -> SimpleNamespace:
    """The tab's components."""
    with gr.Tab("Render", id="render") as tab:
        gr.Markdown("Lip-sync a speech file onto an avatar and download the mp4 (25 fps, H.264 + AAC).")
        with gr.Row():
            with gr.Column():
                render_avatar = avatars.avatar_dropdown("Avatar")
                audio = gr.Audio(label="Speech", sources=["upload", "microphone"], type="filepath")
                render_btn = gr.Button("Render", variant="primary", elem_id="render-btn")
            with gr.Column():
                render_video = gr.Video(label="Lip-synced video", interactive=False, height=480)
    return SimpleNamespace(
        tab=tab, render_avatar=render_avatar, audio=audio, render_btn=render_btn, render_video=render_video
    )


def wire(actions: RenderActions, c: SimpleNamespace) -> None:
    c.render_btn.click(
        actions.render_clip, [c.render_avatar, c.audio], c.render_video,
        api_name="render", concurrency_id="render", concurrency_limit=1,
    )  # fmt: skip
