"""The avatar as the face of an agent: Pipecat STT / LLM / TTS services built from the bot config.

Say mode:          transport.input() -> TTS -> MuseTalk -> transport.output()
Conversation mode: transport.input() -> Silero VAD -> STT -> user context -> LLM -> TTS -> MuseTalk
                   -> transport.output() -> assistant context

Every service is one of Pipecat's own classes (OpenAI-compatible STT/LLM/TTS, local Whisper, Piper)
or our offline espeak-ng voice; nothing here speaks HTTP by hand. `check_services` asks each
endpoint once before a bot starts (with the `openai` client, as the services themselves do), so
a wrong address fails the start with one sentence instead of a silent avatar.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair, LLMUserAggregatorParams
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.transports.base_transport import BaseTransport
from pipecat.turns.user_stop.speech_timeout_user_turn_stop_strategy import SpeechTimeoutUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from musetalk.bot.agent_config import ServiceConfig, SpeechSetup
from musetalk.bot.pipeline import VAD_PARAMS, room_input
from musetalk.bot.processor import MuseTalkProcessor
from musetalk.config import AUDIO_SAMPLE_RATE
from musetalk.errors import ConfigError, ServiceUnavailableError

CHECK_TIMEOUT_S = 4.0
NO_KEY = "none"  # the openai client insists on a key; local servers (Ollama, llama.cpp) ignore it
USER_SPEECH_TIMEOUT_S = 0.4  # after the VAD says the user stopped, how long until the turn is answered
# Pipecat's STT latency figures assume the VAD confirms the end of speech after 0.2 s of silence.
CONVERSATION_VAD = VAD_PARAMS.model_copy(update={"stop_secs": 0.2})


@dataclass
class SpeechServices:
    stt: Any | None
    llm: Any | None
    tts: Any


# ---------------------------------------------------------------------------------------- services
def build_tts(setup: SpeechSetup) -> Any:
    cfg = setup.config.tts
    if cfg.service == "espeak":
        from musetalk.bot.espeak import EspeakTTSService

        return EspeakTTSService(voice=cfg.voice or "en-us")
    if cfg.service == "piper":
        return _piper_tts(cfg, setup.models_dir)
    from pipecat.services.openai.tts import OpenAITTSService

    settings = OpenAITTSService.Settings(**_given(model=cfg.model, voice=cfg.voice))
    return OpenAITTSService(api_key=cfg.api_key(setup.keys) or NO_KEY, base_url=cfg.base_url, settings=settings)


def _piper_tts(cfg: ServiceConfig, models_dir: Path | None) -> Any:
    voice = cfg.voice or "en_US-lessac-medium"
    folder = (models_dir or Path("models")) / "piper"
    model = Path(voice) if voice.endswith(".onnx") else folder / f"{voice}.onnx"
    if not model.is_file() or not model.with_name(model.name + ".json").is_file():
        raise ConfigError(
            f"tts.service piper: the voice {model} (and its .onnx.json) is missing: fetch it with "
            "python -m musetalk.weights fetch, or pick tts.service espeak."
        )
    try:
        from pipecat.services.piper.tts import PiperTTSService
    except Exception as exc:  # pipecat raises a bare Exception when piper-tts is absent
        raise ConfigError(
            f"tts.service piper needs the piper-tts package ({exc}): pip install 'pipecat-ai[piper]==1.14.0' "
            "(GPL-3.0), or pick tts.service espeak."
        ) from None
    # Pipecat loads download_dir/<voice>.onnx and downloads only when that file is absent (it is not, here).
    return PiperTTSService(download_dir=model.parent, settings=PiperTTSService.Settings(voice=model.stem))


def build_stt(setup: SpeechSetup) -> Any:
    cfg = setup.config.stt
    language = _language(cfg)
    if cfg.service == "whisper":
        try:
            from pipecat.services.whisper.stt import WhisperSTTService
        except Exception as exc:  # pipecat raises a bare Exception when faster-whisper is absent
            raise ConfigError(
                f"stt.service whisper transcribes locally with faster-whisper, which is not installed ({exc}): "
                "pip install faster-whisper, or use stt.service openai with a speech-to-text server."
            ) from None
        settings = WhisperSTTService.Settings(**_given(model=cfg.model, language=language))
        return WhisperSTTService(settings=settings)
    from pipecat.services.openai.stt import OpenAISTTService

    settings = OpenAISTTService.Settings(**_given(model=cfg.model, language=language))
    return OpenAISTTService(api_key=cfg.api_key(setup.keys) or NO_KEY, base_url=cfg.base_url, settings=settings)


def build_llm(setup: SpeechSetup) -> Any:
    """The system prompt goes in as the service's system instruction (sent first with every request)."""
    from pipecat.services.openai.llm import OpenAILLMService

    cfg = setup.config.llm
    settings = OpenAILLMService.Settings(**_given(model=cfg.model), system_instruction=setup.config.system_prompt)
    return OpenAILLMService(api_key=cfg.api_key(setup.keys) or NO_KEY, base_url=cfg.base_url, settings=settings)


def build_services(setup: SpeechSetup, mode: str) -> SpeechServices:
    """Fresh service instances for one pipeline (Pipecat services belong to one pipeline each)."""
    if mode == "conversation":
        return SpeechServices(stt=build_stt(setup), llm=build_llm(setup), tts=build_tts(setup))
    return SpeechServices(stt=None, llm=None, tts=build_tts(setup))


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _language(cfg: ServiceConfig) -> Any:
    if not cfg.language:
        return None
    from pipecat.transcriptions.language import Language

    try:
        return Language(cfg.language)
    except ValueError:
        raise ConfigError(
            f"{cfg.role}.language {cfg.language!r} is not a language code Pipecat knows (e.g. en, de, fr)."
        ) from None


# ---------------------------------------------------------------------------------------- pipelines
def build_say_pipeline(
    transport: BaseTransport,
    processor: MuseTalkProcessor,
    services: SpeechServices,
    voice: FrameProcessor | None = None,
) -> Pipeline:
    """The operator's text is spoken by the TTS and lip-synced; the room's audio is not used."""
    return Pipeline([*room_input(transport, voice), services.tts, processor, transport.output()])


def build_conversation_pipeline(
    transport: BaseTransport,
    processor: MuseTalkProcessor,
    services: SpeechServices,
    voice: FrameProcessor | None = None,
) -> Pipeline:
    """STT -> LLM (system prompt + the conversation so far) -> TTS -> avatar; the user speaking interrupts."""
    context = LLMContext()
    strategies = UserTurnStrategies(stop=[SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=USER_SPEECH_TIMEOUT_S)])
    pair = LLMContextAggregatorPair(context, user_params=LLMUserAggregatorParams(user_turn_strategies=strategies))
    vad = VADProcessor(vad_analyzer=SileroVADAnalyzer(sample_rate=AUDIO_SAMPLE_RATE, params=CONVERSATION_VAD))
    return Pipeline(
        [
            *room_input(transport, voice), vad, services.stt, pair.user(), services.llm, services.tts, processor,
            transport.output(), pair.assistant(),
        ]
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- checks
def check_services(setup: SpeechSetup, mode: str, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Before a start: each service the mode needs answers (or exists). Raises one readable sentence."""
    config = setup.config
    needed = [config.tts] if mode == "say" else [config.stt, config.llm, config.tts]
    for cfg in needed:
        if cfg.service == "openai":
            _check_openai_endpoint(cfg, cfg.api_key(setup.keys), config.where, timeout)
        else:
            cfg.api_key(setup.keys)  # an unset variable is a mistake even where the service takes no key
    build_services(setup, mode)  # local services: binaries, packages and voice files are there


def _check_openai_endpoint(cfg: ServiceConfig, key: str | None, where: str, timeout: float) -> None:
    client = openai.OpenAI(base_url=cfg.base_url, api_key=key or NO_KEY, timeout=timeout, max_retries=0)
    what = {"stt": "speech-to-text service", "llm": "LLM", "tts": "text-to-speech service"}[cfg.role]
    try:
        client.models.list()
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        source = f"the key in ${cfg.api_key_env}" if cfg.api_key_env else "no key (set api_key_env)"
        raise ServiceUnavailableError(
            f"The {what} at {cfg.base_url} refused {source} (HTTP {exc.status_code}): check the key, "
            f"or {cfg.role}.api_key_env in {where}."
        ) from None
    except openai.NotFoundError:
        return  # it answers; some servers (speaches, vLLM audio) have no model list
    except openai.APIStatusError as exc:
        if exc.status_code >= 500:
            raise ServiceUnavailableError(
                f"The {what} at {cfg.base_url} answers with an error (HTTP {exc.status_code}): look at its log."
            ) from None
    except (openai.APIConnectionError, openai.APITimeoutError):
        hint = "start Ollama (ollama serve) or " if cfg.role == "llm" else "start it or "
        raise ServiceUnavailableError(
            f"No {what} answers at {cfg.base_url}: {hint}set {cfg.role}.base_url in {where}."
        ) from None
    finally:
        client.close()
    logger.debug("{} at {} answers", what, cfg.base_url)
