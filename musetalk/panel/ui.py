"""The Blocks app: the banner, then the Avatars, Live, Render and System tabs wired to one engine."""

from __future__ import annotations

import gradio as gr

from musetalk.panel import avatars, live, render, system
from musetalk.panel.engine import STATUS_EVERY_S, Engine
from musetalk.panel.text import models_banner

CSS = """
.toast-text, .toast-body { white-space: pre-line; }
#bot-status table { margin-top: .4rem; }
"""


def build_ui(engine: Engine, *, on_spaces: bool = False) -> gr.Blocks:
    """The panel; on Hugging Face Spaces the Live tab defaults to a Daily room."""
    avatar_actions = avatars.AvatarActions(engine)
    live_actions = live.LiveActions(engine)
    render_actions = render.RenderActions(engine)
    system_actions = system.SystemActions(engine)

    with gr.Blocks(title="MuseTalk Live", delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown("# MuseTalk Live · control panel\nPrepare an avatar from a video, run it live, or render a clip.")
        timer = gr.Timer(STATUS_EVERY_S)  # outside the tabs: hidden tabs are not mounted, their timers would not tick
        banner = gr.Markdown(models_banner(engine), elem_id="models-banner")
        live_page_key = gr.State("")

        with gr.Tabs():
            avatars_tab = avatars.build(avatar_actions)
            live_tab = live.build(engine, avatar_actions, on_spaces=on_spaces)
            render_tab = render.build(avatar_actions)
            system_tab = system.build()

        dropdowns = [live_tab.live_avatar, render_tab.render_avatar]

        def refresh_dropdowns(live_value: str | None, render_value: str | None):
            return avatar_actions.avatar_choices(live_value), avatar_actions.avatar_choices(render_value)

        avatars.wire(avatar_actions, avatars_tab, dropdowns, refresh_dropdowns)
        live.wire(live_actions, live_tab, banner, timer, live_page_key, demo.load)
        render.wire(render_actions, render_tab)
        system.wire(system_actions, system_tab, banner)

        for tab in (avatars_tab.tab, live_tab.tab, render_tab.tab):
            tab.select(refresh_dropdowns, dropdowns, dropdowns, api_visibility="private", queue=False)
        library_out = [
            avatars_tab.library_gallery,
            avatars_tab.library_table,
            avatars_tab.lib_select,
            avatars_tab.library_empty,
        ]
        demo.load(
            avatar_actions.library.refresh_library, avatars_tab.lib_select, library_out, api_visibility="private"
        ).then(refresh_dropdowns, dropdowns, dropdowns, api_visibility="private").then(
            system_actions.view, None, [system_tab.system_md, system_tab.weights_table], api_visibility="private"
        ).then(system_actions.banner, None, banner, api_visibility="private")
    return demo
