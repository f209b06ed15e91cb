"""Real Pipecat 1.14 speech services in real pipelines, against a local OpenAI stand-in.

Why: the bot's "speak for an agent" mode wires STT -> LLM -> TTS -> avatar from Pipecat's own
services; these tests pin what they send and receive (context, key, audio formats, frames),
and that the built-in offline voice (EspeakTTSService) streams, stops on interruption and
fails with sentences a person can act on. No network: OpenAI is the stand-in in tests/.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import time
import wave
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
import psutil
import pytest
from openai_standin import OpenAIStandIn, espeak_pcm
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMMessagesAppendFrame,
    LLMRunFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.frames.frames import LLMTextFrame as LLMText
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.openai.stt import OpenAISTTService
from pipecat.services.openai.tts import OpenAITTSService
from pipecat.workers.runner import WorkerRunner

from musetalk.bot.espeak import EspeakTTSService, espeak_executable, parse_wav_header
from musetalk.errors import ConfigError

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (test.sh installs it)"
)
KEY = "sk-standin-test"
SYSTEM = "You are a friendly avatar. Answer in one short sentence."
# One long sentence (commas only): the base TTS speaks a sentence per run_tts call, so this
# keeps espeak-ng busy for seconds, long enough to interrupt it.
LONG_TEXT = ", ".join(["the quick brown fox jumps over the lazy dog while the avatar keeps on talking"] * 60) + "."


class FrameLog(FrameProcessor):
    """Records the frames going one way past it (with arrival times) and passes everything on."""

    def __init__(self, direction: FrameDirection):
        super().__init__()
        self.direction = direction
        self.entries: list[tuple[float, Frame]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if direction == self.direction:
            self.entries.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)

    def of(self, *types: type) -> list:
        return [f for _, f in self.entries if isinstance(f, types)]


@dataclass
class Running:
    worker: PipelineWorker
    upstream: FrameLog  # frames that reached the head going up (errors)
    downstream: FrameLog  # frames that reached the tail going down

    async def send(self, *frames: Frame) -> None:
        for frame in frames:
            await self.worker.queue_frame(frame)

    async def wait_for(self, what: str, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                kinds = [type(f).__name__ for _, f in self.downstream.entries][-12:]
                raise AssertionError(f"no {what} within {timeout} s; last frames down: {kinds}")
            await asyncio.sleep(0.01)


@asynccontextmanager
async def running(*processors: FrameProcessor, after: tuple[FrameProcessor, ...] = (), **params):
    """A real PipelineWorker + WorkerRunner around head log -> processors -> tail log -> after."""
    upstream, downstream = FrameLog(FrameDirection.UPSTREAM), FrameLog(FrameDirection.DOWNSTREAM)
    pipeline = Pipeline([upstream, *processors, downstream, *after])
    worker = PipelineWorker(pipeline, params=PipelineParams(**params), idle_timeout_secs=None, enable_rtvi=False)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(worker, frame):
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(started.wait(), 10)
        yield Running(worker, upstream, downstream)
    finally:
        await worker.cancel()
        await asyncio.wait_for(run, 10)


def audio_of(frames: list[TTSAudioRawFrame]) -> np.ndarray:
    return np.frombuffer(b"".join(f.audio for f in frames), dtype=np.int16)


def seconds_of(frames: list[TTSAudioRawFrame]) -> float:
    return sum(len(f.audio) / 2 / f.sample_rate for f in frames)


def espeak_children() -> list[psutil.Process]:
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    alive = []
    for child in children:
        try:
            if "espeak" in child.name() and child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.Error:
            pass
    return alive


@pytest.fixture(scope="module")
def api():
    with OpenAIStandIn(chunk_delay_s=0.01) as server:
        yield server


# -- OpenAI services against the stand-in ------------------------------------------------------


def test_openai_llm_streams_the_reply_and_sends_the_whole_context(api):
    # Pipecat 1.14: the system prompt belongs on the service (a "system" message in LLMContext
    # is deprecated since 1.9); it is sent as the first message of every request.
    context = LLMContext(messages=[{"role": "user", "content": "Who are you"}])
    pair = LLMContextAggregatorPair(context)
    settings = OpenAILLMService.Settings(model="gpt-4o-mini", system_instruction=SYSTEM)
    llm = OpenAILLMService(base_url=api.base_url, api_key=KEY, settings=settings)
    before = len(api.chat_requests())

    async def scenario():
        async with running(pair.user(), llm, after=(pair.assistant(),)) as bot:
            await bot.send(LLMRunFrame())
            await bot.wait_for("end of the reply", lambda: bot.downstream.of(LLMFullResponseEndFrame))
            first = "".join(f.text for f in bot.downstream.of(LLMText))
            # Second turn: the assistant aggregator must have put the reply into the context.
            await bot.wait_for("assistant message", lambda: context.get_messages()[-1].get("role") == "assistant")
            user2 = {"role": "user", "content": "Say it again"}
            await bot.send(LLMMessagesAppendFrame(messages=[user2], run_llm=True))
            await bot.wait_for("second reply", lambda: len(bot.downstream.of(LLMFullResponseEndFrame)) >= 2)
            return first, bot

    first, bot = asyncio.run(scenario())
    assert first == "You said: Who are you."
    assert len(bot.downstream.of(LLMText)) >= 4, "the reply is streamed, a frame per chunk"
    assert bot.downstream.of(LLMFullResponseStartFrame) and not bot.upstream.of(ErrorFrame)
    requests = api.chat_requests()[before:]
    assert len(requests) == 2
    sent = requests[0]
    assert sent.api_key == KEY and sent.json["model"] == "gpt-4o-mini" and sent.json["stream"] is True
    assert [(m["role"], m["content"]) for m in sent.messages] == [("system", SYSTEM), ("user", "Who are you")]
    roles = [m["role"] for m in requests[1].messages]
    assert roles == ["system", "user", "assistant", "user"]
    assert requests[1].messages[2]["content"] == "You said: Who are you."


def test_openai_llm_wrong_key_is_an_error_frame():
    with OpenAIStandIn(require_key="right-key") as server:
        llm = OpenAILLMService(base_url=server.base_url, api_key="wrong-key")
        context = LLMContext(messages=[{"role": "user", "content": "Hi"}])
        pair = LLMContextAggregatorPair(context)

        async def scenario():
            async with running(pair.user(), llm) as bot:
                await bot.send(LLMRunFrame())
                await bot.wait_for("error", lambda: bot.upstream.of(ErrorFrame))
                return bot

        bot = asyncio.run(scenario())
        assert server.chat_requests()[0].api_key == "wrong-key"
    errors = " ".join(e.error for e in bot.upstream.of(ErrorFrame))
    assert "401" in errors or "API key" in errors, errors
    assert not bot.downstream.of(LLMText)


@needs_espeak
def test_openai_tts_audio_matches_espeak_duration(api):
    text = "The avatar speaks this sentence."
    tts = OpenAITTSService(base_url=api.base_url, api_key=KEY)

    async def scenario():
        async with running(tts, audio_out_sample_rate=24000) as bot:
            await bot.send(TTSSpeakFrame(text))
            await bot.wait_for("TTSStoppedFrame", lambda: bot.downstream.of(TTSStoppedFrame))
            return bot

    bot = asyncio.run(scenario())
    frames = bot.downstream.of(TTSAudioRawFrame)
    expected = len(espeak_pcm(text)) / 2 / 24000
    assert frames and all(f.sample_rate == 24000 and f.num_channels == 1 for f in frames)
    assert abs(seconds_of(frames) - expected) < 0.05 + 0.03 * expected, (seconds_of(frames), expected)
    assert np.abs(audio_of(frames)).max() > 1000
    sent = api.requests_to("/audio/speech")[-1]
    assert sent.json["input"] == text and sent.json["response_format"] == "pcm" and sent.api_key == KEY


@needs_espeak
def test_openai_stt_transcribes_a_vad_segment(api):
    pcm = espeak_pcm("Hello there, how are you?", rate=16000)
    stt = OpenAISTTService(base_url=api.base_url, api_key=KEY, settings=OpenAISTTService.Settings(model="whisper-1"))
    step = 640  # 20 ms of 16 kHz int16, what SmallWebRTC delivers

    async def scenario():
        async with running(stt, audio_in_sample_rate=16000) as bot:
            await bot.send(VADUserStartedSpeakingFrame())
            for start in range(0, len(pcm) - step + 1, step):
                await bot.send(InputAudioRawFrame(audio=pcm[start : start + step], sample_rate=16000, num_channels=1))
            await bot.send(VADUserStoppedSpeakingFrame())
            await bot.wait_for("TranscriptionFrame", lambda: bot.downstream.of(TranscriptionFrame))
            return bot

    bot = asyncio.run(scenario())
    (transcript,) = bot.downstream.of(TranscriptionFrame)
    assert transcript.text == "Hello there, how are you?" and transcript.finalized
    sent = api.requests_to("/audio/transcriptions")[-1]
    assert sent.form["model"] == "whisper-1" and sent.api_key == KEY
    with wave.open(io.BytesIO(sent.files["file"].data)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        seconds = wav.getnframes() / 16000
    speech = (len(pcm) // step * step) / 2 / 16000
    assert speech + 0.4 < seconds < speech + 0.6, "the segment plus ~0.5 s of trailing silence"


# -- EspeakTTSService ----------------------------------------------------------------------------


def test_espeak_missing_program_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="bash run.sh") as info:
        EspeakTTSService(executable="/nonexistent/espeak-ng")
    assert "sudo apt-get install espeak-ng" in str(info.value) and "/nonexistent/espeak-ng" in str(info.value)
    monkeypatch.setattr("musetalk.bot.espeak.shutil.which", lambda name: None)
    assert espeak_executable() is None
    with pytest.raises(ConfigError, match="tts.service in the bot config"):
        EspeakTTSService()


def test_wav_header_parser_ignores_streamed_sizes():
    fmt = (16).to_bytes(4, "little") + bytes.fromhex("0100 0100 2256 0000 44ac 0000 0200 1000".replace(" ", ""))
    header = b"RIFF\xff\xff\xff\x7fWAVEfmt " + fmt + b"LIST" + (4).to_bytes(4, "little") + b"INFO"
    stream = header + b"data\xff\xff\xff\x7f" + b"\x01\x00" * 10
    assert parse_wav_header(stream[:30]) is None
    assert parse_wav_header(stream) == (22050, 1, 16, len(header) + 8)
    with pytest.raises(ValueError):
        parse_wav_header(b"ID3\x04" + bytes(40))


@needs_espeak
@pytest.mark.parametrize("rate", [16000, 24000])
def test_espeak_speaks_hello_world(rate):
    tts = EspeakTTSService()

    async def scenario():
        async with running(tts, audio_out_sample_rate=rate) as bot:
            await bot.send(TTSSpeakFrame("Hello world"))
            await bot.wait_for("TTSStoppedFrame", lambda: bot.downstream.of(TTSStoppedFrame))
            return bot

    bot = asyncio.run(scenario())
    kinds = [type(f) for f in bot.downstream.of(TTSStartedFrame, TTSAudioRawFrame, TTSStoppedFrame)]
    assert kinds[0] is TTSStartedFrame and kinds[-1] is TTSStoppedFrame and TTSAudioRawFrame in kinds
    frames = bot.downstream.of(TTSAudioRawFrame)
    assert all(f.sample_rate == rate and f.num_channels == 1 for f in frames)
    assert 0.5 < seconds_of(frames) < 3.0, seconds_of(frames)
    assert max(len(f.audio) / 2 / rate for f in frames) <= 0.1, "streamed in short chunks"
    assert len({f.context_id for f in frames}) == 1 and frames[0].context_id
    samples = audio_of(frames).astype(np.float64)
    assert np.sqrt(np.mean(samples**2)) > 300, "not silence"
    assert not bot.upstream.of(ErrorFrame)


@needs_espeak
def test_espeak_interruption_stops_audio_and_kills_espeak():
    tts = EspeakTTSService()

    async def scenario():
        async with running(tts) as bot:
            await bot.send(TTSSpeakFrame(LONG_TEXT))
            await bot.wait_for("first audio", lambda: bot.downstream.of(TTSAudioRawFrame))
            assert espeak_children(), "espeak-ng should still be synthesising the long sentence"
            interrupted_at = time.monotonic()
            await bot.send(InterruptionFrame())
            await bot.wait_for("espeak-ng to be gone", lambda: not espeak_children(), timeout=2.0)
            gone_after = time.monotonic() - interrupted_at
            await asyncio.sleep(0.3)
            late = [
                t for t, f in bot.downstream.entries if isinstance(f, TTSAudioRawFrame) and t > interrupted_at + 0.2
            ]
            heard = seconds_of(bot.downstream.of(TTSAudioRawFrame))
            # The service still speaks after an interruption.
            await bot.send(TTSSpeakFrame("Hello again"))
            await bot.wait_for("TTSStoppedFrame", lambda: bot.downstream.of(TTSStoppedFrame))
            return gone_after, late, heard, bot

    gone_after, late, heard, bot = asyncio.run(scenario())
    assert gone_after < 1.0 and not late, (gone_after, len(late))
    assert heard < 60, "the long sentence (minutes of speech) was cut short"
    again = [
        f
        for f in bot.downstream.of(TTSAudioRawFrame)
        if f.context_id == bot.downstream.of(TTSStoppedFrame)[-1].context_id
    ]
    assert 0.4 < seconds_of(again) < 3.0
    assert not espeak_children()


@needs_espeak
def test_espeak_cancel_kills_espeak():
    tts = EspeakTTSService()

    async def scenario():
        async with running(tts) as bot:
            await bot.send(TTSSpeakFrame(LONG_TEXT))
            await bot.wait_for("first audio", lambda: bot.downstream.of(TTSAudioRawFrame))
            assert espeak_children()
        # running() cancels the worker on exit (CancelFrame)
        deadline = time.monotonic() + 2.0
        while espeak_children() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    asyncio.run(scenario())
    assert not espeak_children()


@needs_espeak
def test_espeak_unknown_voice_is_an_error_frame_naming_it_and_a_settings_update_recovers():
    # A failed sentence sends no audio, so its audio context only ends after stop_frame_timeout_s (shortened from
    # Pipecat's default; long enough that a loaded machine's espeak-ng start does not end the good sentence early).
    tts = EspeakTTSService(voice="xx-nosuchvoice", stop_frame_timeout_s=2.0)

    def named(bot):
        return [e for e in bot.upstream.of(ErrorFrame) if "xx-nosuchvoice" in e.error]

    async def scenario():
        async with running(tts) as bot:
            await bot.send(TTSSpeakFrame("Hello world"))
            await bot.wait_for("error naming the voice", lambda: named(bot))
            assert not tts.is_usable, "an unknown voice is a permanent (invalid request) error"
            await bot.send(TTSUpdateSettingsFrame(delta=EspeakTTSService.Settings(voice="en-us")))
            await bot.send(TTSSpeakFrame("Hello world"))
            await bot.wait_for("audio after the fix", lambda: bot.downstream.of(TTSAudioRawFrame))

            def stopped_after_its_audio() -> bool:  # (the failed sentence's context may stop in between)
                frames = bot.downstream.of(TTSAudioRawFrame, TTSStoppedFrame)
                return isinstance(frames[-1], TTSStoppedFrame)

            await bot.wait_for("a TTSStoppedFrame after the audio", stopped_after_its_audio)
            return bot

    bot = asyncio.run(scenario())
    (error,) = named(bot)
    assert "espeak-ng --voices" in error.error
    assert 0.5 < seconds_of(bot.downstream.of(TTSAudioRawFrame)) < 3.0


@needs_espeak
def test_espeak_words_per_minute_sets_the_pace():
    slow, fast = EspeakTTSService(words_per_minute=100), EspeakTTSService(words_per_minute=300)
    text = "This sentence has exactly eight words in it."

    async def speak(tts):
        async with running(tts) as bot:
            await bot.send(TTSSpeakFrame(text))
            await bot.wait_for("TTSStoppedFrame", lambda: bot.downstream.of(TTSStoppedFrame))
            return seconds_of(bot.downstream.of(TTSAudioRawFrame))

    slow_s, fast_s = asyncio.run(speak(slow)), asyncio.run(speak(fast))
    assert slow_s > 2 * fast_s, (slow_s, fast_s)


# -- the whole chain ------------------------------------------------------------------------------


@needs_espeak
def test_spoken_question_goes_through_stt_llm_and_espeak(api):
    """VAD frames + mic audio -> OpenAI STT -> user aggregator -> OpenAI LLM -> espeak-ng audio."""
    pcm = espeak_pcm("Hello there, how are you?", rate=16000)
    context = LLMContext()
    pair = LLMContextAggregatorPair(context)
    stt = OpenAISTTService(base_url=api.base_url, api_key=KEY, settings=OpenAISTTService.Settings(model="whisper-1"))
    settings = OpenAILLMService.Settings(model="gpt-4o-mini", system_instruction=SYSTEM)
    llm = OpenAILLMService(base_url=api.base_url, api_key=KEY, settings=settings)
    processors = (stt, pair.user(), llm, EspeakTTSService())

    async def scenario():
        async with running(*processors, after=(pair.assistant(),), audio_in_sample_rate=16000) as bot:
            await bot.send(VADUserStartedSpeakingFrame())
            for start in range(0, len(pcm) - 639, 640):
                await bot.send(InputAudioRawFrame(audio=pcm[start : start + 640], sample_rate=16000, num_channels=1))
            await bot.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
            await bot.wait_for("spoken reply", lambda: bot.downstream.of(TTSStoppedFrame))
            await bot.wait_for("assistant message", lambda: context.get_messages()[-1].get("role") == "assistant")
            return bot

    bot = asyncio.run(scenario())
    down = bot.downstream
    # The user aggregator turns VAD frames into user turn frames and interrupts the bot itself.
    assert down.of(UserStartedSpeakingFrame) and down.of(InterruptionFrame) and down.of(UserStoppedSpeakingFrame)
    assert "".join(f.text for f in down.of(TTSTextFrame)).strip() == "You said: Hello there, how are you?"
    assert 1.0 < seconds_of(down.of(TTSAudioRawFrame)) < 5.0
    assert context.get_messages() == [
        {"role": "user", "content": "Hello there, how are you?"},
        {"role": "assistant", "content": "You said: Hello there, how are you?"},
    ]
    assert api.chat_requests()[-1].messages[0] == {"role": "system", "content": SYSTEM}
