"""The Avatars tab's library view: the gallery and table of avatars, the selected avatar's details,
and the two steps that start from it (load it into the editor, ask before deleting it).

No API endpoints here: listing, renaming, re-preparing and deleting are `AvatarActions` in
`musetalk.panel.avatars`, which builds this view and wires its events.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from musetalk.config import PrepareSettings
from musetalk.errors import AvatarError, MuseTalkError
from musetalk.panel.boundary import operator_errors
from musetalk.panel.engine import Engine
from musetalk.panel.text import damaged_markdown, delete_question, manifest_dict, manifest_markdown, older_markdown
from musetalk.weights import format_bytes

LIBRARY_COLUMNS = (
    "name", "state", "frames", "seconds", "size", "bbox_shift", "mask", "landmarks", "format", "disk", "created",
)  # fmt: skip


class LibraryView:
    """What the library shows (UI refreshes, no API), bound to one engine.

    `list_avatars` lists every avatar, prepared and damaged (the `list_avatars` API endpoint).
    """

    def __init__(self, engine: Engine, list_avatars: Callable[[], list[dict]]):
        self.engine = engine
        self.store = engine.store
        self.list_avatars = list_avatars

    def refresh_library(self, selected: str | None):
        entries = self.list_avatars()
        manifests = [m for m in entries if not m["damaged"]]
        damaged = [m for m in entries if m["damaged"]]
        names = [m["name"] for m in entries]
        gallery = []
        for m in manifests:
            thumb = self.store.thumbnail(m["name"])
            if thumb.is_file():
                with Image.open(thumb) as img:
                    gallery.append((img.convert("RGB"), f"{m['name']} · {m['frame_count']} frames"))
        table = pd.DataFrame(
            [
                {
                    "name": m["name"],
                    "state": "ready, older rules: re-prepare" if m["older_rules"] else "ready",
                    "frames": m["frame_count"],
                    "seconds": m["seconds"],
                    "size": f"{m['frame_size'][0]}×{m['frame_size'][1]}",
                    "bbox_shift": m["preparation"].get("bbox_shift"),
                    "mask": m["preparation"].get("mask_mode_used"),
                    "landmarks": m["landmark_source"] or "not recorded",
                    "format": m["format_version"],
                    "disk": format_bytes(m["disk_bytes"]),
                    "created": m["created"],
                }
                for m in manifests
            ]
            + [{"name": d["name"], "state": f"DAMAGED: {d['reason']}"} for d in damaged],
            columns=list(LIBRARY_COLUMNS),
        ).sort_values("name", ignore_index=True)
        value = selected if selected in names else (names[0] if names else None)
        older = [m for m in manifests if m["older_rules"]]
        note = "\n\n".join(
            ([older_markdown(older)] if older else []) + ([damaged_markdown(damaged)] if damaged else [])
        )
        if not names:
            note = "No avatars yet: upload a video above, check the preview, then press **Prepare**."
        return gallery, table, gr.Dropdown(choices=names, value=value), note

    def show_avatar(self, name: str | None):
        if not name:
            return "", None, gr.Row(visible=False)
        damaged = [d for d in self.list_avatars() if d["damaged"] and d["name"] == name]
        if damaged:
            return damaged_markdown(damaged), damaged[0], gr.Row(visible=False)
        try:
            data = manifest_dict(self.store.manifest(name))
        except MuseTalkError as exc:
            return f"**{html.escape(str(exc))}**", None, gr.Row(visible=False)
        return manifest_markdown(data), data, gr.Row(visible=False)

    def pick_from_gallery(self, evt: gr.SelectData):
        caption = evt.value.get("caption") if isinstance(evt.value, dict) else None
        return caption.split(" · ")[0] if caption else gr.skip()

    @operator_errors
    def load_into_editor(self, name: str | None):
        if not name:
            raise AvatarError("Pick an avatar in the library first.")
        m = manifest_dict(self.store.manifest(name))
        prep = m["preparation"]
        video = m["source_video"] if m["source_exists"] else None
        if video is None:
            gr.Warning(f"The source video of {name!r} is gone: upload it again to preview.")
        # An avatar made by older rules comes back with today's size cap and landmark choice.
        today = PrepareSettings()
        current = not m["older_rules"]
        return (
            video,
            name,
            True,
            prep.get("bbox_shift", 0),
            prep.get("extra_margin", 10),
            prep.get("parsing_mode", "jaw"),
            prep.get("cheek_width", 90),
            prep.get("max_side", today.max_side) if current else today.max_side,
            prep.get("landmarks", today.landmarks) if current else today.landmarks,
        )

    @operator_errors
    def confirm_delete(self, name: str | None):
        if not name:
            raise AvatarError("Pick an avatar in the library first.")
        self.engine.refuse_if_in_use(name, "delete")
        damaged = any(d.name == name for d in self.store.damaged())
        if not damaged and not self.store.exists(name):
            raise AvatarError(f"No avatar named {name!r}: press Refresh.")
        return gr.Row(visible=True), delete_question(name, self.engine.source_deleted_with(name), damaged=damaged)


def build_library(avatar_dropdown: Callable[..., gr.Dropdown]) -> dict[str, Any]:
    """3. Library: the gallery and table of avatars, and rename / re-prepare / delete of the selected one.

    `avatar_dropdown(label, **kwargs)` makes the picker of the selected avatar (`AvatarActions.avatar_dropdown`).
    """
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

    return {k: v for k, v in locals().items() if k != "avatar_dropdown"}
