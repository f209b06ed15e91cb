"""The Live tab: start and stop live bots (local WebRTC page or a Daily room), their status and plots,
and the generation service they share.

API names: `start_bot`, `stop_bot`, `bot_status` (the newest bot), `list_bots`, `stop_bot_id`, `service_status`.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from musetalk.bot.daily import DEFAULT_LEAVE_WHEN_ALONE_MIN, DailyRoomSettings
from musetalk.bot.runner import BotStatus
from musetalk.bot.transports import (
    DAILY_URL_EXAMPLE,
    DEFAULT_HOST,
    DEFAULT_PORT,
    TransportSettings,
    validate_room_url,
)
from musetalk.errors import AvatarError, ConfigError, MuseTalkError
from musetalk.panel import speech
from musetalk.panel.avatars import AvatarActions
from musetalk.panel.boundary import PROGRESS, duration_for, message, operator_errors, scrub
from musetalk.panel.engine import Engine
from musetalk.panel.text import (
    BOTS_HEADERS,
    MODE_HELP,
    bots_rows,
    models_banner,
    page_view,
    service_view,
    status_view,
)

DEFAULT_LATENCY_BUDGET_S = 0.2


class LiveActions:
    """The tab's actions, bound to one engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.store = engine.store

    # ------------------------------------------------------------ API: live bot
    @operator_errors
    def start_bot(
        self,
        avatar: str,
        transport: str = "local",
        room_url: str = "",
        token: str = "",
        mode: str = "mirror",
        local_port: float = DEFAULT_PORT,
        local_host: str = DEFAULT_HOST,
        latency_budget: float = DEFAULT_LATENCY_BUDGET_S,
        bot_name: str = "MuseTalk avatar",
        follow: str = "active",
        mirror_audio: bool = False,
        leave_when_alone: float = DEFAULT_LEAVE_WHEN_ALONE_MIN,
        share_room: bool = False,
        never_follow: str = "",
        progress=PROGRESS,
    ) -> dict:
        """Start a live bot (another one while others run, up to --max-bots): on a local WebRTC page, or in a Daily room.

        Args:
            avatar: a prepared avatar's name
            transport: "local" (a page on this machine, no account) or "daily"
            room_url: the Daily room URL (daily only), e.g. https://your-domain.daily.co/room-name; other hosts are refused
            token: the Daily meeting token (daily, private rooms); never shown or logged
            mode: "mirror" (lip-sync whoever speaks), "say" (speak the text sent with `say`) or "conversation" (STT -> LLM -> TTS from the bot config, barge-in)
            local_port: port of the local page (0 = any free port)
            local_host: address of the local page (127.0.0.1: this machine only)
            latency_budget: seconds a frame may wait for the model before it is shown idle (audio waits with it)
            bot_name: the bot's display name in the Daily room
            follow: whose voice a Daily bot takes, one person at a time: "active" (the active speaker, switching between utterances), "first" (the first to join) or a participant's name
            mirror_audio: mirror mode in a Daily room: also publish the voice (off: video only, the room hears the speaker already)
            leave_when_alone: minutes with nobody in the Daily room before the bot leaves (0 = never)
            share_room: allow a second bot in a Daily room another bot serves (on purpose only: they re-publish each other)
            never_follow: display names of participants that are bots (another avatar, a recorder), separated by commas
        Returns:
            the bot status (state, url of the local page, ...)
        """
        from musetalk.bot.processor import LiveSettings  # imports pipecat: only when a bot starts

        token = (token or "").strip() or None
        try:
            if not avatar:
                raise AvatarError("Pick an avatar (prepare one in the Avatars tab first).")
            mode = "say" if mode == "speech" else (mode or "mirror")
            speaking = self.engine.speech_setup() if mode in ("say", "conversation") else None
            if transport == "daily":
                room = DailyRoomSettings(
                    follow=(follow or "active").strip(),
                    publish_audio=True if mirror_audio else None,
                    leave_when_alone_min=DEFAULT_LEAVE_WHEN_ALONE_MIN if leave_when_alone is None else leave_when_alone,
                    share_room=bool(share_room),
                    never_follow=tuple((never_follow or "").split(",")),  # the settings trim names and drop empty ones
                )
                name = (bot_name or "").strip() or "MuseTalk avatar"
                settings = TransportSettings(kind="daily", room_url=room_url, token=token, bot_name=name, daily=room)
            else:
                port = int(local_port) if local_port is not None else DEFAULT_PORT
                host = (local_host or DEFAULT_HOST).strip()
                settings = TransportSettings(
                    kind=transport or "local",
                    host=host,
                    port=port,
                    ice_servers=self.engine.options.ice_servers,
                    page_key=self.engine.page_key_for(host),
                )
            budget = DEFAULT_LATENCY_BUDGET_S if latency_budget is None else float(latency_budget)
            live = LiveSettings(mode=mode, latency_budget_s=budget)
            runner = self.engine.runner(
                on_wait=lambda: progress(0.0, desc="Loading the models (first use after start)")
            )
            self.engine.refuse_if_preparing(avatar)
            progress(0.5, desc="Starting the bot")
            self.engine.clear_history()
            status = runner.start(avatar, settings, live, avatar_store=self.store, speech=speaking)
        except MuseTalkError as exc:
            secrets = [token, *self.engine.speech_secrets()]
            text = str(exc)
            for secret in secrets:  # the runner scrubs its own errors; this covers the rest
                text = scrub(text, secret)
            if text != str(exc):
                raise MuseTalkError(text) from None
            raise
        return status.to_dict()

    @operator_errors
    def stop_bot(self) -> dict:
        """Stop the live bot; answers within about a second in every state, and is safe when it is not running.

        A bot still leaving a Daily room finishes that in the background; after a failed start, stop
        clears the error state ("stopped") and keeps `last_error` readable.

        Returns:
            the bot status after stopping
        """
        runner = self.engine.existing_runner()
        if runner is None:
            return BotStatus().to_dict()
        return runner.stop().to_dict()

    @operator_errors
    def stop_bot_id(self, bot_id: str) -> dict:
        """Stop one bot by its id (as `list_bots` names it); the others go on.

        Args:
            bot_id: the bot's id, e.g. "bot-2"
        Returns:
            that bot's status after stopping
        """
        runner = self.engine.existing_runner()
        if not bot_id:
            raise ConfigError("Pick a bot to stop (the Running bots table lists them).")
        if runner is None:
            raise ConfigError(f"No bot {bot_id!r}: no bot was started yet.")
        return runner.stop(bot_id).to_dict()

    def list_bots(self) -> list[dict]:
        """Every bot: running ones and the last few that ended, each with its status (bot_id, state, viewers, fps, ...).

        Returns:
            a list of bot statuses (JSON)
        """
        runner = self.engine.existing_runner()
        return [b.to_dict() for b in runner.bots()] if runner is not None else []

    def service_status(self) -> dict | None:
        """The generation service all bots share: sessions, queued frames, frames/s, mean batch, cost per frame, capacity, GPU memory.

        Returns:
            the service figures (JSON), or null before the first bot started
        """
        runner = self.engine.existing_runner()
        stats = runner.service_stats() if runner is not None else None
        return json_ready(dataclasses.asdict(stats)) if stats is not None else None

    def bot_status(self) -> dict:
        """The newest running bot's status: bot_id, state, avatar, transport, url, mode, viewers, viewer_connected, uptime_s, fps, frames, mouth_latency_ms, realtime, model_ms_per_frame, warning, last_error, worker_pid (its own process on the Ray backend).

        Returns:
            the status (JSON)
        """
        return self.engine.bot_status().to_dict()

    def plots(self):
        rows = self.engine.history()
        frame = pd.DataFrame(rows, columns=["uptime_s", "fps", "latency_ms"], dtype=float).round(1)
        return frame.dropna(subset=["fps"]), frame.dropna(subset=["latency_ms"])

    def refresh_live(self, last_url: str | None, picked: str | None):
        status = self.bot_status()
        fps_frame, lat_frame = self.plots()
        page_key = page_view(status, self.engine.page_key)
        page = gr.skip() if page_key == last_url else page_key
        bots = self.list_bots()
        running = [b["bot_id"] for b in bots if b["state"] in ("starting", "running", "stopping")]
        pick = gr.update(choices=running, value=picked if picked in running else (running[-1] if running else None))
        table = pd.DataFrame(bots_rows(bots), columns=BOTS_HEADERS)
        service = service_view(self.service_status(), self.engine.options.max_bots)
        return (
            models_banner(self.engine), status_view(status), status, fps_frame, lat_frame, page, page_key,
            table, pick, service,
        )  # fmt: skip

    def show_transport(self, kind: str):
        return gr.Group(visible=kind == "daily"), gr.Accordion(visible=kind == "local")

    def check_room_url(self, url: str) -> None:
        """As soon as the field is left: say what is wrong with a room URL (Start refuses it the same way)."""
        if not (url or "").strip():
            return
        try:
            validate_room_url(url)
        except ConfigError as exc:
            gr.Warning(message(str(exc)), duration=duration_for(str(exc)))

    def show_mode(self, mode: str):
        return gr.Markdown(MODE_HELP.get(mode, ""))


def _build_daily(on_spaces: bool) -> tuple:
    """The Daily room's fields: the room, its token, and how the bot behaves in it."""
    with gr.Group(visible=on_spaces) as daily_group:
        room_url = gr.Textbox(
            label="Daily room URL",
            placeholder=DAILY_URL_EXAMPLE,
            info="A room on your own Daily domain (https://your-domain.daily.co/...); other hosts are refused.",
        )
        token = gr.Textbox(
            label="Daily token (optional, private rooms)",
            type="password",
            placeholder="never shown or logged",
        )
        with gr.Accordion("In the room", open=False):
            bot_name = gr.Textbox(label="Bot name", value="MuseTalk avatar", max_length=100)
            follow = gr.Textbox(
                label="Follow", value="active",
                info="Whose voice the bot takes, one person at a time: active (the active speaker, "
                "switching between utterances), first (the first to join), or a participant's name.",
            )  # fmt: skip
            mirror_audio = gr.Checkbox(
                label="Mirror mode: publish the voice too",
                value=False,
                info="Off: video only (the room hears the speaker already; on, everyone hears them twice).",
            )
            leave_when_alone = gr.Number(
                label="Leave when alone (min)", value=DEFAULT_LEAVE_WHEN_ALONE_MIN, minimum=0,
                maximum=1440, info="0 = never.",
            )  # fmt: skip
            never_follow = gr.Textbox(
                label="Never follow",
                value="",
                placeholder="Recorder, Other avatar",
                info="Participants that are bots, by display name (commas between names); our own bots are never followed.",
            )
            share_room = gr.Checkbox(
                label="Allow a second bot in this room",
                value=False,
                info="On purpose only: two mirror bots re-publish each other.",
            )
    return daily_group, room_url, token, bot_name, follow, mirror_audio, leave_when_alone, share_room, never_follow


def build(engine: Engine, avatars: AvatarActions, *, on_spaces: bool = False) -> SimpleNamespace:
    """The tab's components; on Hugging Face Spaces the transport defaults to a Daily room."""
    default_transport = "daily" if on_spaces else "local"
    with gr.Tab("Live", id="live") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                live_avatar = avatars.avatar_dropdown("Avatar")
                transport = gr.Radio(
                    [("Local page on this machine (no account)", "local"), ("Daily room", "daily")],
                    value=default_transport, label="Transport",
                )  # fmt: skip
                (daily_group, room_url, token, bot_name, follow, mirror_audio, leave_when_alone, share_room,
                 never_follow) = _build_daily(on_spaces)  # fmt: skip
                with gr.Accordion("Local page address", open=False, visible=not on_spaces) as local_group:
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
                    [("Mirror: lip-sync whoever speaks", "mirror"), ("Say: speak the text you type", "say"),
                     ("Conversation: answer with an LLM", "conversation")],
                    value="mirror", label="Mode", elem_id="mode",
                )  # fmt: skip
                speech_note = gr.Markdown(MODE_HELP["mirror"], elem_id="mode-help")
                if on_spaces:
                    gr.Markdown(
                        "**Note:** on Hugging Face Spaces your browser cannot reach the local page (WebRTC needs a TURN "
                        "server there): use a Daily room."
                    )
                latency_budget = gr.Number(
                    label="Latency budget (s)", value=DEFAULT_LATENCY_BUDGET_S, minimum=0.05, maximum=60,
                    info="How long a frame may wait for the model before it is shown idle; its audio waits with it, so "
                    "lips stay in sync. A slow device with a larger budget shows a late but moving mouth.",
                )  # fmt: skip
                with gr.Row():
                    start_btn = gr.Button("Start", variant="primary", elem_id="start-btn")
                    stop_btn = gr.Button("Stop newest", variant="stop", elem_id="stop-btn")
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
                bots_table = gr.Dataframe(
                    pd.DataFrame(columns=BOTS_HEADERS), label="Bots", interactive=False, elem_id="bots-table"
                )
                with gr.Row():
                    picked_bot = gr.Dropdown([], label="Bot", scale=2, allow_custom_value=True, elem_id="picked-bot")
                    stop_picked_btn = gr.Button("Stop this bot", variant="stop", scale=1, elem_id="stop-picked-btn")
                speech_box = speech.build()
                service_md = gr.Markdown(service_view(None, engine.options.max_bots), elem_id="service-status")
        page_html = gr.HTML()

    return SimpleNamespace(**{k: v for k, v in locals().items() if k not in ("engine", "avatars")})


def wire(
    actions: LiveActions, c: SimpleNamespace, banner: gr.Markdown, timer: gr.Timer, page_key: gr.State, demo_load
) -> None:
    """Events of the tab; the timer refreshes the banner, the status and the plots once a second."""
    live_out = [
        banner, c.status_md, c.status_json, c.fps_plot, c.lat_plot, c.page_html, page_key,
        c.bots_table, c.picked_bot, c.service_md,
    ]  # fmt: skip
    live_in = [page_key, c.picked_bot]
    c.transport.change(
        actions.show_transport, c.transport, [c.daily_group, c.local_group], api_visibility="private", queue=False
    )
    c.room_url.blur(actions.check_room_url, c.room_url, None, api_visibility="private", queue=False)
    c.mode.change(actions.show_mode, c.mode, c.speech_note, api_visibility="private", queue=False)
    speech.wire(speech.SpeechActions(actions.engine), c.speech_box, c.picked_bot, c.mode, timer, demo_load)
    c.start_btn.click(
        actions.start_bot,
        [c.live_avatar, c.transport, c.room_url, c.token, c.mode, c.local_port, c.local_host, c.latency_budget,
         c.bot_name, c.follow, c.mirror_audio, c.leave_when_alone, c.share_room, c.never_follow],
        c.status_json, api_name="start_bot", concurrency_id="bot_start", concurrency_limit=1, show_progress_on=c.status_md,
    ).then(actions.refresh_live, live_in, live_out, api_visibility="private")  # fmt: skip
    c.stop_btn.click(
        actions.stop_bot, None, c.status_json, api_name="stop_bot", concurrency_limit=None, show_progress_on=c.status_md
    ).then(actions.refresh_live, live_in, live_out, api_visibility="private")
    c.stop_picked_btn.click(
        actions.stop_bot_id, c.picked_bot, c.status_json, api_name="stop_bot_id", concurrency_limit=None,
    ).then(actions.refresh_live, live_in, live_out, api_visibility="private")  # fmt: skip
    timer.tick(
        actions.refresh_live, live_in, live_out,
        api_visibility="private", concurrency_limit=None, show_progress="hidden",
    )  # fmt: skip
    gr.api(actions.bot_status, api_name="bot_status", concurrency_limit=None)
    gr.api(actions.list_bots, api_name="list_bots", concurrency_limit=None)
    gr.api(actions.service_status, api_name="service_status", concurrency_limit=None)


def json_ready(value):
    """Dict keys as strings (batch size -> count maps have int keys, which Gradio's JSON encoder refuses)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
