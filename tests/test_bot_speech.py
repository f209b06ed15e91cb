"""Say and conversation bots through `BotRunner`: real Pipecat services, the espeak-ng voice, an
OpenAI-compatible stand-in (tests/openai_standin.py) for STT and LLM, the tiny models.

A local viewer's pipeline runs without media (tests/viewers.py); the user's speech is queued into
it as the transport would deliver it. What a browser sees and hears is test_bot_speech_browser.py's.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import media
import numpy as np
import pytest
from helpers import wait_until
from loguru import logger
from openai_standin import OpenAIStandIn, unreachable_url
from pipecat.frames.frames import InputAudioRawFrame
from viewers import candidate_free_offer, media_less_page

from musetalk.bot.agent_config import BotConfig, ServiceConfig, SpeechSetup, load_bot_config
from musetalk.bot.processor import LiveSettings
from musetalk.bot.runner import BotRunner
from musetalk.bot.transports import TransportSettings
from musetalk.errors import ConfigError, MuseTalkError
from musetalk.live.service import GenerationService, ServiceSettings
from musetalk.media import load_audio

SECRET = "sk-test-7f3a9c1e5b"
ESPEAK = ServiceConfig("tts", "espeak", voice="en-us")
LONG_TEXT = (
    "This is a long announcement from the avatar. It goes on for a while, sentence after sentence, "
    "so that there is plenty of time to interrupt it before it is over. Nobody should hear the end of it."
)


@pytest.fixture
def runner(models):
    r = BotRunner(models, max_bots=3, service=GenerationService(models, ServiceSettings(admission=False)))
    yield r
    r.stop_all(timeout=15)
    r.join_closing(15)


def open_viewer(runner: BotRunner, bot_id: str):
    """A viewer pipeline on the bot's local page; returns its session."""
    status = runner.status(bot_id)
    answer = httpx.post(f"{status.url}api/offer", json={"sdp": candidate_free_offer(), "type": "offer"}, timeout=30)
    assert answer.status_code == 200, answer.text
    pc_id = answer.json()["pc_id"]
    run = runner._runs[bot_id]
    assert wait_until(lambda: pc_id in run.sessions, 20), list(run.sessions)
    session = run.sessions[pc_id]
    assert wait_until(lambda: session.processor.stats().frames > 3, 20), "the viewer's pipeline emits video"
    return run, session


def speak_into(run, session, pcm: np.ndarray, silence_s: float = 1.2) -> None:
    """The user's voice as the transport delivers it: 20 ms frames of 16 kHz mono, then silence."""
    samples = np.concatenate([pcm, np.zeros(int(16000 * silence_s), np.int16)])
    frames = [InputAudioRawFrame(samples[i : i + 320].tobytes(), 16000, 1) for i in range(0, len(samples) - 319, 320)]
    asyncio.run_coroutine_threadsafe(session.worker.queue_frames(frames), run.loop).result(10)


@pytest.fixture(scope="module")
def user_pcm(speech) -> np.ndarray:
    return (load_audio(speech) * 32767).astype(np.int16)


@pytest.fixture(scope="module")
def hello_pcm(media_dir) -> np.ndarray:
    """Two words without a pause: one VAD segment, so one transcription per utterance."""
    return (load_audio(media.speech_wav(media_dir / "hello-there.wav", "Hello there")) * 32767).astype(np.int16)


def start_say_bot(runner, avatar, **kwargs):
    setup = SpeechSetup(BotConfig(tts=ESPEAK), lambda name: None)
    live = LiveSettings(mode="say", latency_budget_s=1.0)
    return runner.start(avatar, media_less_page(), live, speech=setup, **kwargs)


def test_say_interrupt_and_say_again(runner, prepared_avatar):
    status = start_say_bot(runner, prepared_avatar)
    assert status.state == "running" and status.mode == "say"
    with pytest.raises(MuseTalkError, match="Nobody is watching"):
        runner.say(status.bot_id, "Hello.")
    run, session = open_viewer(runner, status.bot_id)

    t0 = time.monotonic()
    runner.say(status.bot_id, LONG_TEXT)
    assert time.monotonic() - t0 < 1.5, "say() returns at once"
    assert wait_until(lambda: runner.status(status.bot_id).speaking, 10), runner.status(status.bot_id)
    assert wait_until(lambda: runner.status(status.bot_id).first_mouth_ms is not None, 20), "a moving mouth"
    first_mouth = runner.status(status.bot_id).first_mouth_ms
    assert 0 < first_mouth < 5000
    generated = session.processor.stats().generated_frames
    assert generated > 0

    t_stop = time.monotonic()
    runner.interrupt(status.bot_id)
    assert wait_until(lambda: not runner.status(status.bot_id).speaking, 1.0, step=0.02), "silent within a second"
    stopped_after = time.monotonic() - t_stop
    time.sleep(0.5)
    after = session.processor.stats().generated_frames
    time.sleep(1.0)
    assert session.processor.stats().generated_frames == after, "no speech frames after the interruption"
    assert runner.status(status.bot_id).state == "running"
    turns = runner.status(status.bot_id).transcript
    assert any(t["role"] == "avatar" and t["interrupted"] for t in turns), turns
    assert "end of it" not in " ".join(t["text"] for t in turns), "the rest was dropped"

    runner.say(status.bot_id, "Hello again.")
    assert wait_until(lambda: runner.status(status.bot_id).speaking, 10)
    assert wait_until(lambda: session.processor.stats().generated_frames > after, 20), "it speaks again"
    assert wait_until(lambda: not runner.status(status.bot_id).speaking, 20), "and ends by itself"
    assert wait_until(lambda: "Hello again" in runner.status(status.bot_id).transcript[-1]["text"], 5)
    print(f"\nsay: first mouth {first_mouth:.0f} ms after the first TTS audio; speech stopped {stopped_after * 1000:.0f} ms "
          "after interrupt()")  # fmt: skip


def test_say_text_and_mode_errors_are_sentences(runner, prepared_avatar):
    status = start_say_bot(runner, prepared_avatar)
    with pytest.raises(ConfigError, match="text is empty"):
        runner.say(status.bot_id, "   ")
    with pytest.raises(ConfigError, match="10000 characters.*Split it"):
        runner.say(status.bot_id, "a" * 10_000)
    mirror = runner.start(prepared_avatar, TransportSettings(kind="local", port=0))
    with pytest.raises(ConfigError, match="mirror mode.*say or conversation"):
        runner.say(mirror.bot_id, "Hello.")
    with pytest.raises(ConfigError, match="No bot 'bot-99'"):
        runner.interrupt("bot-99")
    assert runner.status(status.bot_id).state == "running" and runner.status(mirror.bot_id).state == "running"


def conversation_config(api: OpenAIStandIn, prompt: str = "You are Astro, a friendly astronaut.") -> BotConfig:
    return BotConfig(
        system_prompt=prompt,
        stt=ServiceConfig("stt", "openai", api.base_url, "whisper-1", "TEST_STT_KEY"),
        llm=ServiceConfig("llm", "openai", api.base_url, "test-llm", "TEST_LLM_KEY"),
        tts=ESPEAK,
    )


KEYS = {"TEST_STT_KEY": SECRET, "TEST_LLM_KEY": SECRET}.get


def test_a_conversation_remembers_and_is_interrupted_by_the_user(runner, prepared_avatar, hello_pcm):
    heard = ["What is your name?", "Tell me a long story.", "Stop, please."]
    transcribed: list[str] = []

    def transcribe(_wav: bytes) -> str:
        transcribed.append(heard[min(len(transcribed), len(heard) - 1)])
        return transcribed[-1]

    replies = {"What is your name?": "My name is Astro.", "Tell me a long story.": LONG_TEXT, "Stop, please.": "Okay."}

    def answer(messages: list[dict]) -> str:
        # A reply cut off before its first sentence was said leaves no assistant message: Pipecat then
        # sends the user's next words together with the words it interrupted.
        said = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        return next(reply for heard_text, reply in reversed(replies.items()) if said.endswith(heard_text))

    logs: list[str] = []
    sink = logger.add(lambda m: logs.append(str(m)), level="DEBUG")
    try:
        with OpenAIStandIn(transcribe=transcribe, reply=answer, require_key=SECRET) as api:
            setup = SpeechSetup(conversation_config(api), KEYS)
            live = LiveSettings(mode="conversation", latency_budget_s=1.0)
            status = runner.start(prepared_avatar, media_less_page(), live, speech=setup)
            bot = status.bot_id
            run, session = open_viewer(runner, bot)
            hello = hello_pcm

            speak_into(run, session, hello)
            assert wait_until(lambda: any("Astro" in t["text"] for t in runner.status(bot).transcript if t["role"] == "avatar"), 30), runner.status(bot).transcript  # fmt: skip
            first = api.chat_requests()[0]
            assert first.messages[0] == {"role": "system", "content": "You are Astro, a friendly astronaut."}
            assert first.messages[-1]["content"] == "What is your name?" and first.api_key == SECRET
            assert wait_until(lambda: runner.status(bot).turn_latency_ms is not None, 20)

            # The second turn carries the first exchange as context; the user talks over its long answer.
            assert wait_until(lambda: not runner.status(bot).speaking, 20)
            speak_into(run, session, hello)
            assert wait_until(lambda: len(api.chat_requests()) >= 2, 20)
            context = api.chat_requests()[1].messages
            assert [m["role"] for m in context] == ["system", "user", "assistant", "user"], context
            assert "Astro" in context[2]["content"]

            def long_answer_heard() -> bool:
                turns = runner.status(bot).transcript
                asked = [i for i, t in enumerate(turns) if t["role"] == "user" and "long story" in t["text"]]
                return bool(asked) and any(t["role"] == "avatar" for t in turns[asked[-1] :])

            assert wait_until(long_answer_heard, 20), "the long answer is heard"
            time.sleep(0.3)
            t_barge = time.monotonic()
            speak_into(run, session, hello, silence_s=0.0)  # the user starts speaking over it
            assert wait_until(lambda: not runner.status(bot).speaking, 3.0, step=0.02), (
                "the reply stops when the user speaks"
            )
            barge_ms = (time.monotonic() - t_barge) * 1000
            speak_into(run, session, np.zeros(0, np.int16), silence_s=1.2)
            assert wait_until(lambda: any(t["text"] == "Okay." for t in runner.status(bot).transcript), 30)
            final = runner.status(bot)
    finally:
        logger.remove(sink)
    roles = [(t["role"], t["interrupted"]) for t in final.transcript]
    assert ("avatar", True) in roles, json.dumps(final.transcript, indent=0)
    assert " ".join(t["text"] for t in final.transcript if t["role"] == "user").startswith(" ".join(replies))
    assert final.state == "running" and final.turn_latency_p50_ms is not None
    assert SECRET not in json.dumps(final.to_dict()) and not any(SECRET in line for line in logs)
    print(f"\nconversation: reply latency p50 {final.turn_latency_p50_ms:.0f} ms (stand-in LLM, espeak, tiny models); "
          f"barge-in silenced the reply in {barge_ms:.0f} ms (queued audio, no real time)")  # fmt: skip


def test_a_failing_llm_leaves_the_avatar_idle_and_the_bot_running(runner, prepared_avatar, hello_pcm):
    with OpenAIStandIn(transcribe=lambda wav: "Hello?", fail_after=1) as api:
        config = conversation_config(api)
        setup = SpeechSetup(BotConfig(config.system_prompt, config.stt, ServiceConfig("llm", "openai", api.base_url, "m"), ESPEAK), KEYS)  # fmt: skip
        status = runner.start(prepared_avatar, media_less_page(),
                              LiveSettings(mode="conversation", latency_budget_s=1.0), speech=setup)  # fmt: skip
        run, session = open_viewer(runner, status.bot_id)
        speak_into(run, session, hello_pcm)
        assert wait_until(lambda: any(t["role"] == "avatar" for t in runner.status(status.bot_id).transcript), 30)
        assert wait_until(lambda: not runner.status(status.bot_id).speaking, 20)
        speak_into(run, session, hello_pcm)  # this time the LLM answers HTTP 500
        assert wait_until(lambda: any(t["role"] == "error" for t in runner.status(status.bot_id).transcript), 30)
        time.sleep(1.0)
        now = runner.status(status.bot_id)
        assert now.state == "running" and not now.speaking
        assert now.warning and "error" in now.warning.lower(), now


def test_bad_speech_setups_fail_the_start_with_a_sentence(runner, prepared_avatar, tmp_path):
    mirror = runner.start(prepared_avatar, TransportSettings(kind="local", port=0))
    local = TransportSettings(kind="local", port=0)
    conversation = LiveSettings(mode="conversation")
    with OpenAIStandIn(require_key=SECRET) as api:
        unset = SpeechSetup(conversation_config(api), lambda name: None)
        with pytest.raises(ConfigError, match="TEST_STT_KEY, which is not set: export TEST_STT_KEY"):
            runner.start(prepared_avatar, local, conversation, speech=unset)
        wrong = SpeechSetup(conversation_config(api), {"TEST_STT_KEY": "wrong-key", "TEST_LLM_KEY": "wrong-key"}.get)
        with pytest.raises(MuseTalkError, match=r"refused the key in \$TEST_STT_KEY \(HTTP 401\)") as refused:
            runner.start(prepared_avatar, local, conversation, speech=wrong)
        assert "wrong-key" not in str(refused.value)
    dead = unreachable_url()
    config = BotConfig(
        llm=ServiceConfig("llm", "openai", dead, "llama3.2"), stt=ServiceConfig("stt", "openai", dead, "w")
    )
    config = BotConfig(
        system_prompt="x", stt=config.stt, llm=config.llm, tts=ESPEAK, source="configs/bot/conversation.yaml"
    )
    t0 = time.monotonic()
    with pytest.raises(
        MuseTalkError, match=f"No speech-to-text service answers at {dead}: start it or set stt.base_url"
    ):
        runner.start(prepared_avatar, local, conversation, speech=SpeechSetup(config, KEYS))
    assert time.monotonic() - t0 < 10
    llm_only = BotConfig(system_prompt="x", stt=ServiceConfig("stt", "whisper"), llm=config.llm, tts=ESPEAK)
    with pytest.raises(
        MuseTalkError, match=f"No LLM answers at {dead}: start Ollama .* set llm.base_url in configs/bot"
    ):
        runner.start(prepared_avatar, local, conversation, speech=SpeechSetup(llm_only, KEYS))
    with pytest.raises(ConfigError, match="needs a bot config"):
        runner.start(prepared_avatar, local, LiveSettings(mode="say"))
    bad_voice = SpeechSetup(BotConfig(tts=ServiceConfig("tts", "piper", voice="nobody")), KEYS)
    with pytest.raises(ConfigError, match="piper.*missing: fetch it with python -m musetalk.weights fetch"):
        runner.start(prepared_avatar, local, LiveSettings(mode="say"), speech=bad_voice)
    assert runner.status(mirror.bot_id).state == "running", "other bots are not affected"
    assert runner.running_ids() == [mirror.bot_id], "no failed start left a bot behind"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- just\n- a list\n", "must be a YAML mapping with system_prompt, stt, llm and tts"),
        ("system_prompt: hi\ntts: {service: festival}\n", "'festival' is not a text-to-speech service this bot knows; use one of: espeak, piper, openai"),
        ("llm: {service: openai}\n", "llm.base_url is missing"),
        ("llm: {service: openai, base_url: http://x/v1, api_key_env: sk-abc123}\n", "NAME of an environment variable"),
        ("llm: {service: openai, base_url: http://x/v1, key: 1}\n", "unknown fields key"),
        ("system_prompt: ''\n", "system_prompt must be a non-empty text"),
        ("stt: [1, 2\n", "is not valid YAML"),
        ("", "must be a YAML mapping"),
    ],
)  # fmt: skip
def test_bot_config_files_that_cannot_work_are_refused_with_a_sentence(tmp_path, text, message):
    path = tmp_path / "bot.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as refused:
        load_bot_config(path)
    assert str(path) in str(refused.value) and "sk-abc123" not in str(refused.value)


def test_the_shipped_bot_config_reads_and_names_keys_by_variable():
    config = load_bot_config()
    assert config.stt.api_key_env == "STT_API_KEY" and config.llm.api_key_env == "LLM_API_KEY"
    assert (
        config.tts.service == "espeak" and "Answer briefly" in config.system_prompt or "briefly" in config.system_prompt
    )
    assert config.describe()["llm"] == "openai model=llama3.2 base_url=http://127.0.0.1:11434/v1 key from $LLM_API_KEY"
    with pytest.raises(ConfigError, match="does not exist"):
        load_bot_config("nowhere/bot.yaml")
