"""The Avatars tab: preview a video, prepare an avatar, and the library (rename, re-prepare, delete).

This module holds the tab's actions (the API endpoints), its preview and prepare sections and the
wiring of all its events; the library's gallery, table and details are `musetalk.panel.library`.

An avatar the live bot uses cannot be deleted, renamed or prepared again until the bot stops;
damaged avatars (unreadable manifest) are listed with why, and can be deleted. Avatars made by
older preprocessing rules are marked, and re-preparing brings them to the current rules.

API names: `preview`, `prepare`, `cancel_prepare`, `reprepare_avatar`, `list_avatars`,
`rename_avatar`, `delete_avatar`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from musetalk.avatar.prepare import PreparationCancelled, prepare_avatar, reprepare_avatar
from musetalk.avatar.preview import preview_video
from musetalk.avatar.store import AvatarManifest, validate_name
from musetalk.config import PrepareSettings
from musetalk.errors import AvatarError, MediaError, MissingWeightsError
from musetalk.face.dwpose import DWPOSE_FILE
from musetalk.models import Models
from musetalk.panel.boundary import PROGRESS, message, operator_errors
from musetalk.panel.engine import Engine
from musetalk.panel.library import LibraryView, build_library
from musetalk.panel.text import (
    LANDMARKS_HELP,
    PANEL_OFFLINE_HINT,
    manifest_dict,
    prepare_settings,
    suggest_name,
    video_path,
)

Run = Callable[..., AvatarManifest]  # (models, kept source video, progress callback, cancel event) -> manifest


@contextmanager
def dwpose_hint(landmarks: str) -> Iterator[None]:
    """An unusable DWPose file: the core's message, with the panel's way round it (Landmarks = offline)."""
    try:
        yield
    except MissingWeightsError as exc:
        if landmarks == "offline" or not any(DWPOSE_FILE in problem for problem in exc.problems):
            raise
        problems = [p for p in exc.problems if "--landmarks offline" not in p]
        raise MissingWeightsError([*problems, PANEL_OFFLINE_HINT], exc.models_dir, exc.fetch_command) from None


class AvatarActions:
    """The tab's actions (API endpoints, the avatar pickers other tabs use), bound to one engine.

    `library` is the library view (`musetalk.panel.library`), listing avatars through `list_avatars`.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.store = engine.store
        self.library = LibraryView(engine, self.list_avatars)

    def wait_models(self, progress: gr.Progress) -> Models:
        return self.engine.models(on_wait=lambda: progress(0.0, desc="Loading the models (first use after start)"))

    # ------------------------------------------------------------ API: avatars
    @operator_errors
    def preview(
        self,
        video: str,
        bbox_shift: float,
        extra_margin: float,
        parsing_mode: str,
        cheek_width: float,
        max_side: float | None = 1920,
        landmarks: str = "auto",
        progress=PROGRESS,
    ):
        """Preview how a video would be prepared: 4 frames across the clip, nothing is written.

        Args:
            video: the video file (one person facing the camera)
            bbox_shift: moves the mouth-mask line (red) down (+) or up (-), in pixels
            extra_margin: pixels added below the chin
            parsing_mode: blend mask: jaw, raw or polygon
            cheek_width: width of the cheek part of the jaw mask
            max_side: long-side cap in pixels (larger videos are scaled down to it; default 1920)
            landmarks: auto (DWPose when its weight file is present), dwpose or offline (built-in face mesh)
        Returns:
            gallery: 4 images, each the annotated frame (face box green, crop box blue, mask line red, mask tinted) beside a generated frame
            summary: Markdown with the adjustable bbox_shift range, the mask and landmarks used, and notes
        """
        path = video_path(video)
        settings = prepare_settings(bbox_shift, extra_margin, parsing_mode, cheek_width, max_side, landmarks)
        models = self.wait_models(progress)
        progress(0.2, desc="Finding the face and generating preview frames")
        with dwpose_hint(settings.landmarks):
            result = preview_video(models, path, settings, count=4, cache=self.engine.preview_cache)
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

    def auto_preview(
        self, video, bbox_shift, extra_margin, parsing_mode, cheek_width, max_side, landmarks, progress=PROGRESS
    ):
        """Preview on upload or when a setting changes; silent when there is no video yet."""
        if not video:
            return gr.skip(), gr.skip()
        return self.preview(
            video, bbox_shift, extra_margin, parsing_mode, cheek_width, max_side, landmarks, progress=progress
        )

    @operator_errors
    def prepare(
        self,
        video: str,
        name: str,
        bbox_shift: float,
        extra_margin: float,
        parsing_mode: str,
        cheek_width: float,
        replace: bool,
        max_side: float | None = 1920,
        landmarks: str = "auto",
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
            max_side: long-side cap in pixels (larger videos are scaled down to it; default 1920)
            landmarks: auto (DWPose when its weight file is present), dwpose or offline (built-in face mesh)
        Returns:
            the new avatar's manifest (frames, fps, size, parameters, disk size, created)
        """
        path = video_path(video)
        name = validate_name((name or "").strip())
        if self.store.exists(name) and not replace:
            raise AvatarError(f"An avatar named {name!r} already exists: tick 'Replace' or pick another name.")
        settings = prepare_settings(bbox_shift, extra_margin, parsing_mode, cheek_width, max_side, landmarks)

        def run(models: Models, kept: Path, report, cancel) -> AvatarManifest:
            return prepare_avatar(models, self.store, kept, name, settings, progress=report, cancel=cancel)

        action = "replace" if self.store.exists(name) else "prepare"
        return self._run_preparation(path, name, run, settings, progress, action)

    def _run_preparation(
        self, path: Path, name: str, run: Run, settings: PrepareSettings, progress: gr.Progress, action: str
    ) -> dict:
        """`run(models, kept source, progress callback, cancel event)` with the source kept beside the avatars."""
        models = self.wait_models(progress)
        self.engine.begin_preparing(name, action)  # refused while the bot uses this avatar
        try:
            cancel = self.engine.new_cancel()
            kept = self.engine.keep_source(path, name)
            try:
                with dwpose_hint(settings.landmarks):
                    manifest = run(models, kept, lambda f, msg: progress(f, desc=msg), cancel)
            except PreparationCancelled as exc:
                raise gr.Error(message(str(exc)), title="Cancelled", print_exception=False) from None
            finally:
                self.engine.release_source(kept)
        finally:
            self.engine.end_preparing(name)
        gr.Info(f"Avatar {name!r} is ready: {manifest.frame_count} frames.")
        return manifest_dict(manifest)

    def cancel_prepare(self) -> str:
        """Cancel the preparation that is running (nothing is written).

        Returns:
            what happened
        """
        if self.engine.cancel_preparation():
            return "Cancelling: the preparation stops at the next frame; no avatar is written."
        return "No preparation is running."

    @operator_errors
    def reprepare_avatar(
        self,
        name: str,
        bbox_shift: float,
        extra_margin: float,
        parsing_mode: str,
        cheek_width: float,
        video: str | None = None,
        max_side: float | None = 1920,
        landmarks: str = "auto",
        progress=PROGRESS,
    ) -> dict:
        """Prepare an existing avatar again with new settings and the current rules, from its kept source video.

        Avatars made by older preprocessing rules (manifest format 1) come out in the current format.
        Refused while the bot uses the avatar.

        Args:
            name: the avatar to re-prepare
            bbox_shift: moves the mouth-mask line down (+) or up (-), in pixels
            extra_margin: pixels added below the chin
            parsing_mode: blend mask: jaw, raw or polygon
            cheek_width: width of the cheek part of the jaw mask
            video: used only when the avatar's source video no longer exists
            max_side: long-side cap in pixels (larger videos are scaled down to it; default 1920)
            landmarks: auto (DWPose when its weight file is present), dwpose or offline (built-in face mesh)
        Returns:
            the avatar's new manifest
        """
        if not name:
            raise AvatarError("Pick an avatar in the library first.")
        self.engine.refuse_if_in_use(name, "re-prepare")
        manifest = self.store.manifest(name)
        source = Path(manifest.source_video) if manifest.source_video else None
        if source is None or not source.is_file():
            if not video:
                raise MediaError(
                    f"The source video of {name!r} ({manifest.source_video}) no longer exists: upload the video "
                    "in 'Video' above, then press Re-prepare again."
                )
            source = Path(video)
        settings = prepare_settings(bbox_shift, extra_margin, parsing_mode, cheek_width, max_side, landmarks)
        changes = {k: v for k, v in settings.to_dict().items() if k != "max_seconds"}  # the stored clip length stays

        def run(models: Models, kept: Path, report, cancel) -> AvatarManifest:
            return reprepare_avatar(
                models, self.store, name, video_path=kept, progress=report, cancel=cancel, **changes
            )  # fmt: skip

        return self._run_preparation(source, name, run, settings, progress, "re-prepare")

    def list_avatars(self) -> list[dict]:
        """Every avatar: prepared ones with their manifest, damaged ones (unreadable manifest) with why.

        Returns:
            a list sorted by name; each entry has `name`, `damaged` and `reason` (why it is damaged, else
            null); a prepared avatar also has its manifest (frames, fps, size, parameters, disk size,
            created, source video, `format_version`), `landmark_source` (dwpose or offline; null when
            not recorded) and `older_rules` (why to re-prepare it when older preprocessing rules made it,
            else null); a damaged one has `kept_source` (its kept source video, or null)
        """
        entries = [{**manifest_dict(m), "damaged": False, "reason": None} for m in self.store.list()]
        for d in self.store.damaged():
            kept = self.engine.kept_source(d.name)
            entries.append({"name": d.name, "damaged": True, "reason": d.reason, "kept_source": kept and str(kept)})
        return sorted(entries, key=lambda e: e["name"])

    def _refuse_if_damaged(self, name: str, action: str) -> None:
        for d in self.store.damaged():
            if d.name == name:
                raise AvatarError(f"Cannot {action} avatar {name!r}, it is damaged: {d.reason}")

    @operator_errors
    def rename_avatar(self, name: str, new_name: str) -> str:
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
        self.engine.refuse_if_in_use(name, "rename")
        self._refuse_if_damaged(name, "rename")
        self.store.rename(name, new_name)
        gr.Info(f"Renamed {name!r} to {new_name!r}.")
        return new_name

    @operator_errors
    def delete_avatar(self, name: str) -> str:
        """Delete an avatar for good (its frames, masks and latents), damaged ones too; refused while the bot uses it.

        The copy of its source video kept for re-preparing is deleted with it (unless another avatar
        uses the same copy); the confirmation names the file.

        Args:
            name: the avatar to delete
        Returns:
            a confirmation (what was deleted)
        """
        if not name:
            raise AvatarError("Pick an avatar in the library first.")
        source = self.engine.delete_avatar(name)
        done = f"Deleted avatar {name!r}" + (f" and its kept source video {source.name}." if source else ".")
        gr.Info(done)
        return done

    def avatar_dropdown(self, label: str, **kwargs: Any) -> gr.Dropdown:
        # Custom values are allowed so API callers can name avatars prepared after the page was built;
        # the actions check the name and say which avatars exist.
        names = self.usable_names()
        return gr.Dropdown(
            label=label, choices=names, value=names[0] if names else None, allow_custom_value=True, **kwargs
        )

    def usable_names(self) -> list[str]:
        """Avatars a bot or a render can use (damaged ones are only in the library)."""
        damaged = {d.name for d in self.store.damaged()}
        return [name for name in self.store.names() if name not in damaged]

    def avatar_choices(self, selected: str | None = None, fallback_first: bool = True):
        names = self.usable_names()
        value = selected if selected in names else (names[0] if names and fallback_first else None)
        return gr.Dropdown(choices=names, value=value)


def build(actions: AvatarActions) -> SimpleNamespace:
    """The tab's components (inside the caller's `gr.Tabs`)."""
    with gr.Tab("Avatars", id="avatars") as tab:
        preview = _build_preview()
        prepare = _build_prepare()
        library = build_library(actions.avatar_dropdown)
    return SimpleNamespace(tab=tab, **preview, **prepare, **library)


def _build_preview() -> dict[str, Any]:
    """1. Preview: the video, the preparation settings and the annotated preview frames."""
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
            with gr.Row():
                max_side = gr.Number(
                    value=PrepareSettings().max_side, minimum=256, step=64, precision=0, label="Max side (px)",
                    info="Longer sides are scaled down to this; smaller videos keep their native size.", scale=1,
                )  # fmt: skip
                landmarks = gr.Radio(
                    [("Auto", "auto"), ("DWPose", "dwpose"), ("Offline face mesh", "offline")],
                    value=PrepareSettings().landmarks, label="Landmarks", info=LANDMARKS_HELP, scale=2,
                )  # fmt: skip
            preview_btn = gr.Button("Preview", variant="secondary", elem_id="preview-btn")
        with gr.Column(scale=3):
            preview_gallery = gr.Gallery(
                label="Preview: annotated frame | generated frame",
                columns=2,
                format="png",
                object_fit="contain",
            )
            preview_info = gr.Markdown()

    return dict(locals())


def _build_prepare() -> dict[str, Any]:
    """2. Prepare: the avatar name, Prepare / Cancel and the prepared manifest."""
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

    return dict(locals())


def wire(actions: AvatarActions, c: SimpleNamespace, dropdowns: list[gr.Dropdown], refresh_dropdowns) -> None:
    """Events of the tab; `dropdowns` (the Live and Render avatar pickers) follow the library."""
    store, library = actions.store, actions.library
    settings_in = [c.video, c.bbox_shift, c.extra_margin, c.parsing_mode, c.cheek_width, c.max_side, c.landmarks]
    extra_in = [c.max_side, c.landmarks]  # added after the older API inputs, so calls without them keep working
    library_out = [c.library_gallery, c.library_table, c.lib_select, c.library_empty]
    preview_out = [c.preview_gallery, c.preview_info]
    hide_confirm = lambda: gr.Row(visible=False)  # noqa: E731

    c.preview_btn.click(
        actions.preview, settings_in, preview_out,
        api_name="preview", concurrency_id="preview", concurrency_limit=1,
    )  # fmt: skip
    gr.on(
        [c.video.upload, c.bbox_shift.release, c.extra_margin.release, c.cheek_width.release, c.parsing_mode.input,
         c.max_side.submit, c.landmarks.input],
        actions.auto_preview, settings_in, preview_out,
        api_visibility="private", concurrency_id="preview", concurrency_limit=1, trigger_mode="always_last",
    )  # fmt: skip
    c.video.upload(
        lambda v, n: suggest_name(v, n, store.names()), [c.video, c.name], c.name, api_visibility="private", queue=False
    )

    def after_prepare(manifest: dict, live_value: str | None, render_value: str | None):
        note = f"Avatar **{manifest['name']}** is ready ({manifest['frame_count']} frames). Run it in the **Live** tab."
        live = live_value if live_value in store.names() else manifest["name"]
        render_pick = render_value if render_value in store.names() else manifest["name"]
        return (note, *library.refresh_library(manifest["name"]), *refresh_dropdowns(live, render_pick))

    c.prepare_btn.click(
        actions.prepare, [c.video, c.name, c.bbox_shift, c.extra_margin, c.parsing_mode, c.cheek_width, c.replace, *extra_in], c.prepared,
        api_name="prepare", concurrency_id="prepare", concurrency_limit=1, show_progress_on=c.prepare_note,
    ).success(after_prepare, [c.prepared, *dropdowns], [c.prepare_note, *library_out, *dropdowns], api_visibility="private")  # fmt: skip
    c.cancel_btn.click(
        actions.cancel_prepare, None, c.prepare_note, api_name="cancel_prepare", concurrency_limit=None, queue=False
    )

    c.refresh_btn.click(
        actions.list_avatars, None, c.avatars_json, api_name="list_avatars", concurrency_limit=None
    ).then(library.refresh_library, c.lib_select, library_out, api_visibility="private").then(
        refresh_dropdowns, dropdowns, dropdowns, api_visibility="private"
    )
    details = [c.lib_details, c.lib_json, c.confirm_row]
    c.lib_select.change(library.show_avatar, c.lib_select, details, api_visibility="private")
    c.library_gallery.select(library.pick_from_gallery, None, c.lib_select, api_visibility="private")

    c.rename_btn.click(actions.rename_avatar, [c.lib_select, c.new_name], c.renamed, api_name="rename_avatar").success(
        lambda n: ("", *library.refresh_library(n)), c.renamed, [c.new_name, *library_out], api_visibility="private"
    ).then(refresh_dropdowns, dropdowns, dropdowns, api_visibility="private")
    c.delete_btn.click(library.confirm_delete, c.lib_select, [c.confirm_row, c.confirm_text], api_visibility="private")
    c.keep_btn.click(hide_confirm, None, c.confirm_row, api_visibility="private")
    c.confirm_btn.click(actions.delete_avatar, c.lib_select, c.prepare_note, api_name="delete_avatar").then(
        hide_confirm, None, c.confirm_row, api_visibility="private"
    ).then(library.refresh_library, c.lib_select, library_out, api_visibility="private").then(
        refresh_dropdowns, dropdowns, dropdowns, api_visibility="private"
    )
    editor = [c.video, c.name, c.replace, c.bbox_shift, c.extra_margin, c.parsing_mode, c.cheek_width, *extra_in]
    c.edit_btn.click(library.load_into_editor, c.lib_select, editor, api_visibility="private").success(
        actions.auto_preview, settings_in, preview_out, api_visibility="private", concurrency_id="preview", concurrency_limit=1,
    )  # fmt: skip
    c.reprepare_btn.click(
        actions.reprepare_avatar, [c.lib_select, c.bbox_shift, c.extra_margin, c.parsing_mode, c.cheek_width, c.video, *extra_in], c.prepared,
        api_name="reprepare_avatar", concurrency_id="prepare", concurrency_limit=1, show_progress_on=c.prepare_note,
    ).success(
        lambda m: f"Avatar **{m['name']}** prepared again ({m['frame_count']} frames).", c.prepared, c.prepare_note,
        api_visibility="private",
    ).then(library.refresh_library, c.lib_select, library_out, api_visibility="private").then(
        library.show_avatar, c.lib_select, details, api_visibility="private"
    )  # fmt: skip
