"""The Live tab's speaking parts: Say / Stop speaking for a running bot, its transcript, and the bot config.

API names: `say` (bot_id, text), `interrupt_bot` (bot_id), `bot_config` (what the next say or conversation
bot speaks with, no keys), `set_bot_config` (edit it for the next start, optionally save the file),
`check_bot_config` (ask each service once: one sentence on what is missing).
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from musetalk.bot.agent_config import SERVICES
from musetalk.errors import ConfigError, MuseTalkError
from musetalk.panel.boundary import operator_errors
from musetalk.panel.engine import Engine
from musetalk.panel.text import bot_config_view, transcript_view


class SpeechActions:
    """Speaking actions, bound to one engine."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def _runner(self):
        runner = self.engine.existing_runner()
        if runner is None:
            raise ConfigError("No bot is running: start one in Say or Conversation mode first.")
        return runner

    @operator_errors
    def say(self, bot_id: str | None, text: str) -> dict:
        """Make a say or conversation bot speak `text` (queued behind what it is saying; returns at once).

        Args:
            bot_id: the bot's id (as `list_bots` names it); empty = the newest running bot
            text: what to say (at most 2000 characters)
        Returns:
            the bot's status (speaking, transcript, ...)
        """
        return self._runner().say((bot_id or "").strip() or None, text).to_dict()

    @operator_errors
    def interrupt_bot(self, bot_id: str | None = None) -> dict:
        """Stop the bot's speech now (what it is saying and what is queued); the bot keeps running.

        Args:
            bot_id: the bot's id; empty = the newest running bot
        Returns:
            the bot's status
        """
        return self._runner().interrupt((bot_id or "").strip() or None).to_dict()

    @operator_errors
    def bot_config(self) -> dict:
        """What the next say / conversation bot speaks with: config file, system prompt, stt, llm, tts (no keys).

        Returns:
            the configuration (JSON)
        """
        config = self.engine.bot_config()
        return {"config": config.where, **config.to_mapping(), "summary": config.describe()}

    @operator_errors
    def set_bot_config(
        self,
        system_prompt: str,
        stt_service: str,
        stt_base_url: str,
        stt_model: str,
        llm_base_url: str,
        llm_model: str,
        tts_service: str,
        tts_voice: str,
        tts_base_url: str = "",
        save: bool = False,
    ) -> dict:
        """Change the system prompt and services for the next say / conversation start (running bots keep theirs).

        Args:
            system_prompt: how the avatar answers
            stt_service: "openai" (an OpenAI-compatible endpoint) or "whisper" (local)
            stt_base_url: the speech-to-text endpoint, e.g. http://127.0.0.1:8000/v1
            stt_model: e.g. whisper-1
            llm_base_url: the LLM endpoint, e.g. http://127.0.0.1:11434/v1 (Ollama)
            llm_model: e.g. llama3.2
            tts_service: "espeak", "piper" or "openai"
            tts_voice: e.g. en-us (espeak), en_US-lessac-medium (piper), alloy (openai)
            tts_base_url: the TTS endpoint (openai only)
            save: also write it to the bot config file
        Returns:
            the configuration now in use
        """
        current = self.engine.bot_config()
        config = current.with_changes(
            system_prompt=system_prompt, stt_service=stt_service, stt_base_url=stt_base_url, stt_model=stt_model,
            llm_base_url=llm_base_url, llm_model=llm_model, tts_service=tts_service, tts_voice=tts_voice,
            tts_base_url=tts_base_url if tts_service == "openai" else None,
        )  # fmt: skip
        path = self.engine.set_bot_config(config, save=bool(save))
        gr.Info(f"Saved to {path}." if path else "In use for the next start (not saved to the file).")
        return self.bot_config()

    @operator_errors
    def check_bot_config(self, mode: str = "conversation") -> str:
        """Ask each service the mode needs once (the same check a start makes).

        Args:
            mode: "say" (TTS only) or "conversation" (STT, LLM and TTS)
        Returns:
            "ready: ..." or the sentence saying what is missing
        """
        from musetalk.bot.agent import check_services

        if mode not in ("say", "conversation", "mirror", "speech", None, ""):
            raise ConfigError(f"Unknown mode {mode!r}: check_bot_config takes say or conversation.")
        mode = "say" if mode in ("say", "speech") else "conversation"
        try:
            check_services(self.engine.speech_setup(), mode)
        except MuseTalkError as exc:
            text = str(exc)
            for secret in self.engine.speech_secrets():
                text = text.replace(secret, "***")
            return f"Not ready for {mode}: {text}"
        return f"Ready for {mode}: every service answers."

    # ------------------------------------------------------------ UI helpers
    def config_fields(self):
        """The editable fields filled from the config in use (or left as they are when it is broken)."""
        try:
            config = self.engine.bot_config()
        except MuseTalkError as exc:
            return (f"**Bot config:** {exc}",) + (gr.skip(),) * 8
        return (
            bot_config_view(config.describe()), config.system_prompt, config.stt.service, config.stt.base_url or "",
            config.stt.model or "", config.llm.base_url or "", config.llm.model or "", config.tts.service,
            config.tts.voice or "",
        )  # fmt: skip

    def transcript(self, picked: str | None) -> str:
        runner = self.engine.existing_runner()
        if runner is None:
            return transcript_view(None)
        try:
            status = runner.status(picked or None)
        except MuseTalkError:
            status = runner.status()
        return transcript_view(status.to_dict())


def build() -> SimpleNamespace:
    """The Speak box (beside the bots table) and the Speech services accordion."""
    with gr.Group():
        say_text = gr.Textbox(
            label="Speak", placeholder="Text for the picked bot to say (Say or Conversation mode)", lines=2,
            max_length=2000, elem_id="say-text",
        )  # fmt: skip
        with gr.Row():
            say_btn = gr.Button("Say", variant="primary", elem_id="say-btn")
            interrupt_btn = gr.Button("Stop speaking", variant="stop", elem_id="interrupt-btn")
    transcript_md = gr.Markdown(transcript_view(None), elem_id="transcript")
    result_json = gr.JSON(visible=False)  # what say / interrupt_bot / set_bot_config return to API callers
    with gr.Accordion("Speech services (say / conversation)", open=False):
        config_md = gr.Markdown(elem_id="bot-config")
        system_prompt = gr.Textbox(label="System prompt", lines=3)
        with gr.Row():
            stt_service = gr.Dropdown(list(SERVICES["stt"]), label="Speech-to-text")
            stt_base_url = gr.Textbox(label="STT address (openai)")
            stt_model = gr.Textbox(label="STT model")
        with gr.Row():
            llm_base_url = gr.Textbox(label="LLM address (OpenAI-compatible)")
            llm_model = gr.Textbox(label="LLM model")
        with gr.Row():
            tts_service = gr.Dropdown(list(SERVICES["tts"]), label="Text-to-speech")
            tts_voice = gr.Textbox(label="Voice")
            tts_base_url = gr.Textbox(label="TTS address (openai only)")
        gr.Markdown("Keys stay in environment variables (`api_key_env` in the file); they are never shown here.")
        with gr.Row():
            apply_btn = gr.Button("Use for the next start")
            save_btn = gr.Button("Save to the config file")
            check_btn = gr.Button("Check services")
        check_md = gr.Markdown(elem_id="bot-config-check")
        check_mode = gr.State("conversation")
    return SimpleNamespace(**locals())


def wire(actions: SpeechActions, c: SimpleNamespace, picked_bot: gr.Dropdown, mode: gr.Radio, timer: gr.Timer,
         demo_load) -> None:  # fmt: skip
    """Say / Stop speaking act on the picked bot; the transcript follows it every second."""
    c.say_btn.click(
        actions.say, [picked_bot, c.say_text], c.result_json, api_name="say", concurrency_limit=None
    ).success(lambda: "", None, c.say_text, api_visibility="private", queue=False)
    c.say_text.submit(
        actions.say, [picked_bot, c.say_text], c.result_json, api_visibility="private", concurrency_limit=None
    ).success(lambda: "", None, c.say_text, api_visibility="private", queue=False)
    c.interrupt_btn.click(
        actions.interrupt_bot, picked_bot, c.result_json, api_name="interrupt_bot", concurrency_limit=None
    )
    timer.tick(actions.transcript, picked_bot, c.transcript_md, api_visibility="private", show_progress="hidden")
    fields = [c.config_md, c.system_prompt, c.stt_service, c.stt_base_url, c.stt_model, c.llm_base_url, c.llm_model,
              c.tts_service, c.tts_voice]  # fmt: skip
    edits = [c.system_prompt, c.stt_service, c.stt_base_url, c.stt_model, c.llm_base_url, c.llm_model,
             c.tts_service, c.tts_voice, c.tts_base_url]  # fmt: skip
    demo_load(actions.config_fields, None, fields)
    c.apply_btn.click(actions.set_bot_config, edits, c.result_json, api_name="set_bot_config").then(
        actions.config_fields, None, fields, api_visibility="private"
    )
    c.save_btn.click(
        lambda *values: actions.set_bot_config(*values, save=True), edits, c.result_json, api_visibility="private"
    ).then(actions.config_fields, None, fields, api_visibility="private")
    c.check_btn.click(actions.check_bot_config, mode, c.check_md, api_name="check_bot_config")
    gr.api(actions.bot_config, api_name="bot_config", concurrency_limit=None)
