"""The bot config file: what the avatar speaks with (system prompt, speech-to-text, LLM, text-to-speech).

Kept apart from the Pipecat services it describes, so the panel and the CLIs can read, show,
validate and save it without building anything. Keys never live in the file: `api_key_env`
names the environment variable that holds one, and the entry point hands the environment in
as a `KeyLookup`. Nothing here prints a key; `describe()` shows only the variable's name.

    system_prompt: "You are ... Answer briefly."
    stt: {service: openai, base_url: http://127.0.0.1:8000/v1, model: whisper-1, api_key_env: STT_API_KEY}
    llm: {service: openai, base_url: http://127.0.0.1:11434/v1, model: llama3.2, api_key_env: LLM_API_KEY}
    tts: {service: espeak, voice: en-us}
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from musetalk.errors import ConfigError

DEFAULT_BOT_CONFIG = Path("configs/bot/conversation.yaml")
EDITED = " (as edited in the panel, not saved)"
_CHECKOUT = Path(__file__).resolve().parents[2]  # the repository, when running from a checkout
MODES = ("mirror", "say", "conversation")
MAX_SAY_CHARS = 2000  # one say() request; longer text is refused with a sentence (split it)
MAX_PROMPT_CHARS = 8000
SERVICES = {"stt": ("openai", "whisper"), "llm": ("openai",), "tts": ("espeak", "piper", "openai")}
_ROLE_WORDS = {"stt": "speech-to-text", "llm": "LLM", "tts": "text-to-speech"}
_FIELDS = ("service", "base_url", "model", "api_key_env", "voice", "language")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
KeyLookup = Callable[[str], "str | None"]


@dataclass(frozen=True)
class ServiceConfig:
    """One service of the conversation: which implementation, where it answers, which model or voice."""

    role: str  # stt | llm | tts
    service: str
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None  # the NAME of the variable holding the key, never the key
    voice: str | None = None
    language: str | None = None

    def __post_init__(self) -> None:
        where = f"{self.role}.service"
        known = SERVICES.get(self.role)
        if known is None:
            raise ConfigError(f"Unknown service role {self.role!r}; the bot config has stt, llm and tts.")
        if self.service not in known:
            raise ConfigError(
                f"{where}: {self.service!r} is not a {_ROLE_WORDS[self.role]} service this bot knows; "
                f"use one of: {', '.join(known)}."
            )
        if self.service == "openai" and not self.base_url:
            raise ConfigError(
                f"{self.role}.base_url is missing: an OpenAI-compatible {_ROLE_WORDS[self.role]} service needs "
                "its address, e.g. http://127.0.0.1:11434/v1 (Ollama) or https://api.openai.com/v1."
            )
        if self.base_url is not None and not re.match(r"^https?://[^/\s]+", self.base_url):
            raise ConfigError(
                f"{self.role}.base_url must be an http:// or https:// address, e.g. http://127.0.0.1:11434/v1."
            )
        if self.api_key_env is not None and not _ENV_NAME.fullmatch(self.api_key_env):
            raise ConfigError(
                f"{self.role}.api_key_env must be the NAME of an environment variable (e.g. LLM_API_KEY), "
                "not the key itself: keys never go into the config file."
            )

    @property
    def words(self) -> str:
        return _ROLE_WORDS[self.role]

    def api_key(self, keys: KeyLookup) -> str | None:
        """The key from the variable `api_key_env` names; a readable error when that variable is unset."""
        if self.api_key_env is None:
            return None
        value = keys(self.api_key_env)
        if not value:
            raise ConfigError(
                f"{self.role}.api_key_env names {self.api_key_env}, which is not set: "
                f"export {self.api_key_env}=... before starting (or remove api_key_env for an endpoint without a key)."
            )
        return value

    def describe(self) -> str:
        """One line for the panel and the logs (the key's variable name only)."""
        parts = [self.service]
        for name in ("model", "voice", "base_url", "language"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name}={value}")
        if self.api_key_env:
            parts.append(f"key from ${self.api_key_env}")
        return " ".join(parts)

    def to_mapping(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "role" and v is not None}


@dataclass(frozen=True)
class BotConfig:
    """What a say or conversation bot is built from (the bot config file, `--bot-config`)."""

    system_prompt: str = (
        "You are a friendly assistant shown as a talking face. Answer briefly, in one or two sentences."
    )
    stt: ServiceConfig = field(
        default_factory=lambda: ServiceConfig("stt", "openai", "http://127.0.0.1:8000/v1", "whisper-1")
    )
    llm: ServiceConfig = field(
        default_factory=lambda: ServiceConfig("llm", "openai", "http://127.0.0.1:11434/v1", "llama3.2")
    )
    tts: ServiceConfig = field(default_factory=lambda: ServiceConfig("tts", "espeak", voice="en-us"))
    source: str | None = field(default=None, compare=False)  # the file it was read from (sentences say where to fix it)

    def __post_init__(self) -> None:
        if not isinstance(self.system_prompt, str) or not self.system_prompt.strip():
            raise ConfigError("system_prompt must be a non-empty text (what the avatar is and how it answers).")
        if len(self.system_prompt) > MAX_PROMPT_CHARS:
            raise ConfigError(
                f"system_prompt is {len(self.system_prompt)} characters; keep it under {MAX_PROMPT_CHARS}."
            )

    @property
    def where(self) -> str:
        return self.source or str(DEFAULT_BOT_CONFIG)

    def describe(self) -> dict[str, str]:
        """What the panel shows: one line per service, the prompt's start (no keys)."""
        prompt = " ".join(self.system_prompt.split())
        return {
            "config": self.where,
            "system_prompt": prompt if len(prompt) <= 160 else prompt[:157] + "...",
            "stt": self.stt.describe(),
            "llm": self.llm.describe(),
            "tts": self.tts.describe(),
        }

    def to_mapping(self) -> dict[str, Any]:
        return {
            "system_prompt": self.system_prompt,
            "stt": self.stt.to_mapping(),
            "llm": self.llm.to_mapping(),
            "tts": self.tts.to_mapping(),
        }

    def with_changes(self, *, system_prompt: str | None = None, **endpoints: str | None) -> BotConfig:
        """A copy with the panel's edits: `llm_base_url="..."`, `tts_service="openai"`, ... (blank = unset)."""
        services = {"stt": self.stt, "llm": self.llm, "tts": self.tts}
        for key, value in endpoints.items():
            role, _, name = key.partition("_")
            if role not in services or name not in _FIELDS:
                raise ConfigError(f"Unknown bot config field {key!r}.")
            text = (value or "").strip() or None
            if name == "service" and text is None:
                raise ConfigError(f"{role}.service cannot be empty; use one of: {', '.join(SERVICES[role])}.")
            services[role] = replace(services[role], **{name: text})
        prompt = self.system_prompt if system_prompt is None else system_prompt
        edited = replace(self, system_prompt=prompt, **services)
        if edited == self:
            return self
        source = self.where if self.where.endswith(EDITED) else f"{self.where}{EDITED}"
        return replace(edited, source=source)


def parse_bot_config(data: Any, source: str = "the bot config") -> BotConfig:
    """A `BotConfig` from a YAML document's value; every problem is one sentence naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source} must be a YAML mapping with system_prompt, stt, llm and tts (see configs/bot/conversation.yaml); "
            f"it holds {type(data).__name__ if data is not None else 'nothing'}."
        )
    unknown = sorted(set(map(str, data)) - {"system_prompt", "stt", "llm", "tts"})
    if unknown:
        raise ConfigError(f"{source}: unknown entries {', '.join(unknown)}; known: system_prompt, stt, llm, tts.")
    defaults = BotConfig()
    services = {}
    for role in ("stt", "llm", "tts"):
        body = data.get(role)
        if body is None:
            services[role] = getattr(defaults, role)
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: {role} must be a mapping like {{service: ..., base_url: ..., model: ...}}.")
        extra = sorted(set(map(str, body)) - set(_FIELDS))
        if extra:
            raise ConfigError(f"{source}: {role} has unknown fields {', '.join(extra)}; known: {', '.join(_FIELDS)}.")
        if "service" not in body:
            raise ConfigError(f"{source}: {role}.service is missing; use one of: {', '.join(SERVICES[role])}.")
        values = {k: (None if v is None else str(v)) for k, v in body.items()}
        try:
            services[role] = ServiceConfig(role, **values)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    prompt = data.get("system_prompt", defaults.system_prompt)
    try:
        return BotConfig(system_prompt=prompt, source=source, **services)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def default_bot_config_path() -> Path:
    """`configs/bot/conversation.yaml` in the working folder, else the checkout's (started from elsewhere)."""
    for candidate in (DEFAULT_BOT_CONFIG, _CHECKOUT / DEFAULT_BOT_CONFIG):
        if candidate.is_file():
            return candidate
    return DEFAULT_BOT_CONFIG


def load_bot_config(path: str | Path | None = None) -> BotConfig:
    """The bot config file (default `configs/bot/conversation.yaml`); a missing default gives the built-in one."""
    path = Path(path) if path is not None else default_bot_config_path()
    if not path.is_file():
        if path == DEFAULT_BOT_CONFIG:
            return replace(BotConfig(), source=str(path))
        raise ConfigError(f"Bot config {path} does not exist (the default is {DEFAULT_BOT_CONFIG}).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"Bot config {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Bot config {path} cannot be read: {exc}") from None
    return parse_bot_config(data, str(path))


def save_bot_config(config: BotConfig, path: str | Path) -> Path:
    """Write the config atomically (temp file + rename); comments of a hand-written file are not kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    header = "# Bot config (musetalk/bot/agent_config.py). Keys live in environment variables named by api_key_env.\n"
    tmp.write_text(header + yaml.safe_dump(config.to_mapping(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


def check_say_text(text: Any) -> str:
    """The text of a say() request, or a sentence on why it cannot be spoken."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("Type something for the avatar to say (the text is empty).")
    text = " ".join(text.split())
    if len(text) > MAX_SAY_CHARS:
        raise ConfigError(
            f"That text is {len(text)} characters; the avatar says at most {MAX_SAY_CHARS} at a time. "
            "Split it into several Say requests (they queue one behind the other)."
        )
    return text


def environment_keys(environ: Mapping[str, str]) -> KeyLookup:
    """A `KeyLookup` over an environment mapping (the entry points pass `os.environ`)."""
    return lambda name: environ.get(name)


@dataclass(frozen=True)
class SpeechSetup:
    """What a say or conversation bot needs besides its avatar: the config and where keys come from."""

    config: BotConfig
    keys: KeyLookup
    models_dir: Path | None = None  # where `python -m musetalk.weights` put the Piper voice

    def secrets(self) -> list[str]:
        """The key values the config points at (to scrub them from any text shown or logged)."""
        names = {c.api_key_env for c in (self.config.stt, self.config.llm, self.config.tts) if c.api_key_env}
        return [value for value in (self.keys(name) for name in names) if value]

    def portable(self) -> SpeechSetup:
        """The same setup with the keys it needs looked up now (for a bot in another process)."""
        names = {c.api_key_env for c in (self.config.stt, self.config.llm, self.config.tts) if c.api_key_env}
        found = {name: self.keys(name) for name in names}
        return SpeechSetup(self.config, {k: v for k, v in found.items() if v}.get, self.models_dir)
