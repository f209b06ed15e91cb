"""LiveSession in simulated time: no Pipecat, no models, no sleeps."""

from __future__ import annotations

import numpy as np
import pytest

from musetalk.audio import LOOKAHEAD_SAMPLES
from musetalk.errors import ConfigError
from musetalk.live.requests import FrameResult
from musetalk.live.session import FRAME_SECONDS, LiveSession, LiveSettings
from musetalk.testing import synthetic_avatar


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def avatar():
    return synthetic_avatar(frames=4, size=(160, 128), face_box=(50, 30, 110, 100), seed=1)


def make(avatar, clock, requests, **settings):
    return LiveSession(
        session_id="s1", avatar=avatar, settings=LiveSettings(**settings), submit=requests.append, clock=clock
    )


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(16000 * seconds)) * 0.2).astype(np.float32)


def feed(session, clock, pcm, out, chunk=320):
    """Real-time delivery in 20 ms chunks; collects whatever is due along the way."""
    for i in range(0, len(pcm), chunk):
        session.push_audio(pcm[i : i + chunk])
        clock.t += chunk / 16000
        out += session.pop_due()


def answer(session, requests, marker=7):
    """The service's part: a recognisable image for every requested frame."""
    for r in requests:
        h, w = session.size[1], session.size[0]
        session.on_result(FrameResult("s1", images={it.seq: np.full((h, w, 3), marker, np.uint8) for it in r.items}))
    requests.clear()


def test_speech_frames_are_generated_paired_with_their_audio(avatar):
    clock, requests, out = Clock(), [], []
    session = make(avatar, clock, requests, latency_budget_s=0.2)
    session.set_vad(True)
    pcm = np.concatenate([speech(1.0), np.zeros(LOOKAHEAD_SAMPLES + 320, np.float32)])
    for i in range(0, len(pcm), 320):
        session.push_audio(pcm[i : i + 320])
        answer(session, requests)
        clock.t += 0.02
        out += session.pop_due()
    synced = [o for o in out if o.audio is not None]
    assert len(synced) == 26 and all(o.generated for o in synced)
    for i, o in enumerate(synced):  # each frame's own 40 ms, bit-exact
        expected = np.clip(np.round(pcm[i * 640 : (i + 1) * 640] * 32768), -32768, 32767).astype(np.int16)
        np.testing.assert_array_equal(np.frombuffer(o.audio, np.int16), expected)
    stats = session.stats()
    assert stats.generated_frames == 26 and stats.late_frames == 0
    assert 0 < stats.mouth_latency_ms < 200  # look-ahead 132.5 ms + at most one 20 ms chunk


def test_requests_carry_the_audio_window_and_loop_positions(avatar):
    clock, requests = Clock(), []
    session = make(avatar, clock, requests)
    session.set_vad(True)
    feed(session, clock, speech(0.5), [])
    items = [it for r in requests for it in r.items]
    assert [it.frame for it in items] == list(range(len(items))) and len(items) == (8000 - LOOKAHEAD_SAMPLES) // 640 + 1
    p0 = items[0].position  # the idle ticker ran until the first look-ahead arrived: the loop goes on from there
    assert p0 > 0 and [it.position for it in items] == list(range(p0, p0 + len(items)))
    last = requests[-1]
    assert last.first_feature == 0 and len(last.window) == 8000  # everything heard so far
    dues = [it.due for it in items]
    assert all(b - a >= FRAME_SECONDS - 1e-9 for a, b in zip(dues, dues[1:]))


def test_late_frames_leave_idle_at_their_due_time_with_their_audio(avatar):
    clock, requests, shown = Clock(), [], []
    session = make(avatar, clock, requests, latency_budget_s=0.3)
    session.set_vad(True)
    pcm = speech(1.0)
    for i in range(0, len(pcm), 320):  # the service never answers
        session.push_audio(pcm[i : i + 320])
        clock.t += 0.02
        shown += [(clock.t, o) for o in session.pop_due() if o.audio is not None]
    items = [it for r in requests for it in r.items]
    first_ready = (
        100.0 + ((LOOKAHEAD_SAMPLES + 319) // 320 - 1) * 0.02
    )  # pushed with the chunk completing its look-ahead
    assert items[0].due == pytest.approx(first_ready + 0.3)
    assert shown and not any(o.generated for _, o in shown)
    for (t, o), item in zip(shown, items):
        assert t >= item.due  # shown only once its budget was used up
        assert np.array_equal(o.image, session.idle_image(item.position))  # the idle loop instead
    assert session.stats().late_frames == len(shown)


def test_a_larger_budget_waits_for_a_slow_model(avatar):
    clock, requests, out = Clock(), [], []
    session = make(avatar, clock, requests, latency_budget_s=1.0)
    session.set_vad(True)
    feed(session, clock, speech(0.6), out)
    clock.t += 0.8  # the model answers 0.8 s late: still inside the 1 s budget
    answer(session, requests, marker=9)
    out += session.pop_due()
    synced = [o for o in out if o.audio is not None]
    assert synced and all(o.generated and o.image[0, 0, 0] == 9 for o in synced)
    assert session.stats().late_frames == 0


def test_interruption_drops_pending_frames_and_late_answers(avatar):
    clock, requests, out = Clock(), [], []
    session = make(avatar, clock, requests, latency_budget_s=5.0)
    session.set_vad(True)
    feed(session, clock, speech(1.0), out)
    assert session.pending > 0 and not [o for o in out if o.audio is not None]
    session.interrupt()
    answer(session, requests)  # answers for dropped frames arrive after the interruption
    clock.t += 1.0
    out = session.pop_due()
    assert session.pending == 0 and all(o.audio is None and not o.generated for o in out)


def test_idle_ticker_runs_at_25_fps_without_audio(avatar):
    clock, requests, out = Clock(), [], []
    session = make(avatar, clock, requests)
    for _ in range(100):
        out += session.pop_due()
        clock.t = max(clock.t + 0.001, session.next_deadline())
    assert len(out) == 100 and all(o.audio is None for o in out)
    assert out[-1] is not None and session.stats().idle_frames == 100
    assert all(np.array_equal(o.image, session.idle_image(k)) for k, o in enumerate(out))
    assert abs(session.stats().fps - 25) < 0.5


def test_silence_in_mirror_mode_is_idle_and_never_echoed(avatar):
    clock, requests, out = Clock(), [], []
    session = make(avatar, clock, requests)
    feed(session, clock, speech(1.0), out)  # VAD never says speech
    clock.t += 1.0
    out += session.pop_due()
    synced = [o for o in out if o.audio is not None]
    assert not requests and synced and all(not any(o.audio) for o in synced)


def test_speech_mode_slices_the_original_tts_audio_and_releases_the_tail(avatar):
    clock, requests, out = Clock(), [], []
    session = make(avatar, clock, requests, mode="speech", latency_budget_s=0.5)
    rng = np.random.default_rng(3)
    tts24 = (rng.standard_normal(24000 * 3 // 5) * 3000).astype(np.int16)  # 0.6 s at 24 kHz
    pcm16 = (tts24[::3].astype(np.float32) / 32768.0)[: 16000 * 3 // 5]  # stand-in for the resampled copy
    session.push_audio(pcm16, original=tts24.tobytes(), rate=24000, context_id="c1")
    session.end_utterance()
    answer(session, requests)
    clock.t += 1.0
    out += session.pop_due()
    synced = [o for o in out if o.audio is not None]
    assert len(synced) == 15 and all(o.generated and o.audio_rate == 24000 and o.context_id == "c1" for o in synced)
    np.testing.assert_array_equal(np.concatenate([np.frombuffer(o.audio, np.int16) for o in synced]), tts24)


def test_service_errors_and_give_ups_turn_into_late_frames(avatar):
    clock, requests, out = Clock(), [], []
    session = make(avatar, clock, requests, latency_budget_s=5.0)
    session.set_vad(True)
    feed(session, clock, speech(0.5), out)
    seqs = [it.seq for r in requests for it in r.items]
    session.on_result(FrameResult("s1", skipped=tuple(seqs[:2]), frame_cost_s=0.1, capacity=0))
    session.on_result(FrameResult("s1", error="boom"))
    out = session.pop_due()  # no waiting: every frame is known to be late
    assert len(out) == len(seqs) and not any(o.generated for o in out)
    stats = session.stats()
    assert stats.late_frames == len(seqs) and not stats.realtime and "real time needs 25" in stats.warning


def test_settings_validate_the_latency_budget():
    with pytest.raises(ConfigError, match="latency-budget"):
        LiveSettings(latency_budget_s=0)
    assert LiveSettings(latency_budget_s=2.5).latency_budget_s == 2.5


def test_live_settings_from_a_config_section_or_cli_values():
    s = LiveSettings.from_mapping({"mode": "speech", "latency-budget": "1.5", "batch_size": 8})
    assert s.latency_budget_s == 1.5 and s.mode == "speech" and s.batch_size == 8
    assert LiveSettings.from_mapping(s.to_dict()) == s
    with pytest.raises(ConfigError, match="Unknown live settings latency"):
        LiveSettings.from_mapping({"latency": 1})
    with pytest.raises(ConfigError, match="between 0 and 60"):
        LiveSettings.from_mapping({"latency_budget": 120})


def test_stats_say_when_the_service_has_more_sessions_than_it_serves(avatar):
    clock, requests = Clock(), []
    session = make(avatar, clock, requests)
    session.on_result(FrameResult("s1", frame_cost_s=0.01, capacity=4, sessions=3))
    assert session.stats().realtime and session.stats().warning is None
    session.on_result(FrameResult("s1", frame_cost_s=0.01, capacity=4, sessions=6))
    stats = session.stats()
    assert not stats.realtime and "serves 4 sessions at 25 fps; 6 are running" in stats.warning


def _tts_timeline(avatar, frame_cost_s: float, budget_s: float = 1.0) -> tuple[float, list[float]]:
    """A 2 s TTS utterance arriving at once; the service answers one frame per `frame_cost_s` (simulated).
    Returns when the utterance arrived and when each of its frames was handed on."""
    clock, requests, out_times = Clock(), [], []
    session = make(avatar, clock, requests, mode="say", latency_budget_s=budget_s)
    rng = np.random.default_rng(5)
    tts = (rng.standard_normal(16000 * 2) * 3000).astype(np.int16)
    start = clock.t
    session.push_audio(tts.astype(np.float32) / 32768.0, original=tts.tobytes(), rate=16000, context_id="c")
    session.end_utterance()
    items = [it for r in requests for it in r.items]
    h, w = session.size[1], session.size[0]
    step, next_answer, k = 0.005, start + frame_cost_s, 0
    while clock.t < start + 6.0:
        clock.t += step
        while k < len(items) and clock.t >= next_answer:  # the slow device finishes frames one by one
            session.on_result(FrameResult("s1", images={items[k].seq: np.full((h, w, 3), 9, np.uint8)},
                                          frame_cost_s=frame_cost_s, capacity=1, sessions=1))  # fmt: skip
            k, next_answer = k + 1, next_answer + frame_cost_s
        out_times += [clock.t for o in session.pop_due() if o.audio is not None]
    return start, out_times


def test_a_tts_utterance_never_stutters_on_a_device_slower_than_real_time(avatar):
    """Started the moment its first image is ready, a slow device would hand the rest on at its own pace
    (gaps in the voice); it starts at its due time instead, and then every 40 ms."""
    start, times = _tts_timeline(avatar, frame_cost_s=0.1, budget_s=1.0)
    assert len(times) == 50
    assert times[0] >= start + 1.0 - 1e-6, "the first frame waits for its due time"
    playing_until = times[0]
    for t in times:  # played in real time, 40 ms each: every frame is there before the audio ahead of it ends
        assert t <= playing_until + 0.006, f"the voice pauses {(t - playing_until) * 1000:.0f} ms"
        playing_until = max(playing_until, t) + FRAME_SECONDS


def test_a_device_that_keeps_real_time_starts_the_utterance_as_soon_as_it_is_ready(avatar):
    start, times = _tts_timeline(avatar, frame_cost_s=0.02, budget_s=1.0)
    assert len(times) == 50 and times[0] - start < 0.1, "no waiting for the budget on a fast device"


def test_a_large_budget_starts_the_utterance_once_the_rest_will_be_in_time_not_at_the_budget(avatar):
    """Budget 60 s, 100 ms a frame, 2 s of speech: the voice starts when the frames still to make will be ready
    before their turn to play (about 3 s in), and plays without a pause."""
    start, times = _tts_timeline(avatar, frame_cost_s=0.1, budget_s=60.0)
    assert len(times) == 50
    assert 2.0 < times[0] - start < 4.0, times[0] - start
    playing_until = times[0]
    for t in times:
        assert t <= playing_until + 0.006, f"the voice pauses {(t - playing_until) * 1000:.0f} ms"
        playing_until = max(playing_until, t) + FRAME_SECONDS
