"""MuseTalkProcessor in real Pipecat pipelines (Pipecat's own test runner), tiny models, real speech."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from helpers import budget_for
from pipecat.frames.frames import (
    InputAudioRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.tests.utils import SleepFrame, run_test

from musetalk.audio import LOOKAHEAD_SAMPLES
from musetalk.bot.processor import LiveSettings, MuseTalkProcessor
from musetalk.media import load_audio


@pytest.fixture(scope="module")
def speech_pcm(speech) -> np.ndarray:
    return (load_audio(speech) * 32767).astype(np.int16)


def room_audio(pcm: np.ndarray, chunk: int = 320) -> list[InputAudioRawFrame]:
    return [InputAudioRawFrame(pcm[i : i + chunk].tobytes(), 16000, 1) for i in range(0, len(pcm) - chunk + 1, chunk)]


class UnetCalls:
    """Counts real UNet forward passes (and can make the device slow, like a CPU with full-size models)."""

    def __init__(self, unet, delay: float = 0.0):
        self.calls = 0
        self.delay = delay
        self._handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        import time

        self.calls += 1
        if self.delay:
            time.sleep(self.delay)

    def remove(self):
        self._handle.remove()


def images(frames):
    return [f for f in frames if isinstance(f, OutputImageRawFrame)]


def as_array(frame: OutputImageRawFrame) -> np.ndarray:
    w, h = frame.size
    return np.frombuffer(frame.image, np.uint8).reshape(h, w, 3)


def loop_positions(avatar, frames) -> list[int]:
    """Unique avatar frame shown by each idle image (fails if an image is not an avatar frame)."""
    out = []
    for f in frames:
        arr = as_array(f)
        matches = [i for i, fr in enumerate(avatar.frames) if np.array_equal(arr, fr)]
        assert matches, "an idle frame is not one of the avatar's frames"
        out.append(matches[0])
    return out


def follows_ping_pong(avatar, shown: list[int]) -> bool:
    n = len(avatar.cycle)
    return any(all(avatar.frame_index(start + k) == i for k, i in enumerate(shown)) for start in range(n))


def run(processor, frames, **kw):
    down, _ = asyncio.run(run_test(processor, frames_to_send=frames, **kw))
    return list(down)


def test_mirror_mode_pairs_every_frame_with_its_audio(models, prepared_avatar, speech_pcm, frame_cost_s):
    seconds = 2.0
    # A budget in which this device makes all 51 frames in time (from its measured cost, not a fixed minute).
    budget = budget_for(int(seconds * 25) + 1, frame_cost_s)
    proc = MuseTalkProcessor(models=models, avatar=prepared_avatar, settings=LiveSettings(latency_budget_s=budget))
    pcm = speech_pcm[: int(16000 * seconds)]
    tail = np.zeros(LOOKAHEAD_SAMPLES + 320, np.int16)  # lets the last frame's look-ahead arrive
    down = run(proc, [SleepFrame(0.3), VADUserStartedSpeakingFrame(), *room_audio(np.concatenate([pcm, tail]))])
    synced = [f for f in down if isinstance(f, OutputImageRawFrame) and f.sync_with_audio]
    audio = [f for f in down if type(f) is OutputAudioRawFrame]
    assert len(synced) == len(audio) == int(seconds * 25) + 1 + (320 // 640)
    # order: image, then its own 40 ms of audio
    order = [
        type(f)
        for f in down
        if isinstance(f, (OutputImageRawFrame, OutputAudioRawFrame)) and getattr(f, "sync_with_audio", True)
    ]
    assert order[:4] == [OutputImageRawFrame, OutputAudioRawFrame] * 2
    sent = np.concatenate([pcm, tail])
    for i, a in enumerate(audio[:50]):
        assert a.sample_rate == 16000 and len(a.audio) == 1280
        np.testing.assert_array_equal(np.frombuffer(a.audio, np.int16), sent[i * 640 : (i + 1) * 640])
    stats = proc.stats()
    assert stats.generated_frames == 51 and stats.late_frames == 0
    assert stats.mouth_latency_ms is not None and stats.mouth_latency_ms > 0
    # generated frames differ from the avatar only inside the crop box
    first = as_array(synced[0])
    assert first.shape == (512, 512, 3)
    matched = 0
    for i, original in enumerate(prepared_avatar.frames):
        cx0, cy0, cx1, cy1 = prepared_avatar.crop_boxes[i]
        outside = np.ones(first.shape[:2], bool)
        outside[cy0:cy1, cx0:cx1] = False
        if np.array_equal(first[outside], original[outside]):
            matched += 1
            assert not np.array_equal(first, original)  # the mouth region was generated
    assert matched >= 1


def test_silence_gives_idle_frames_without_unet_calls(models, prepared_avatar):
    proc = MuseTalkProcessor(models=models, avatar=prepared_avatar)
    counter = UnetCalls(models.unet)
    try:
        silence = np.zeros(16000, np.int16)
        down = run(proc, [SleepFrame(0.5), *room_audio(silence), SleepFrame(0.5)])
    finally:
        counter.remove()
    assert counter.calls == 1  # the warm-up pass only
    synced = [f for f in images(down) if f.sync_with_audio]
    assert len(synced) == (16000 - LOOKAHEAD_SAMPLES) // 640 + 1
    assert follows_ping_pong(prepared_avatar, loop_positions(prepared_avatar, synced))  # the untouched idle loop
    audio = [f for f in down if type(f) is OutputAudioRawFrame]
    assert all(not any(a.audio) for a in audio)  # never echo while idle
    assert proc.stats().generated_frames == 0


def test_video_flows_with_no_audio_at_all(models, prepared_avatar):
    proc = MuseTalkProcessor(models=models, avatar=prepared_avatar)
    down = run(proc, [SleepFrame(1.0)])
    idle = images(down)
    assert 15 <= len(idle) <= 40  # ~25 fps from the moment the pipeline starts
    assert not any(f.sync_with_audio for f in idle)
    assert loop_positions(prepared_avatar, idle)[:3] == [0, 1, 2]
    assert follows_ping_pong(prepared_avatar, loop_positions(prepared_avatar, idle))


def test_interruption_leaves_no_stale_frame(models, prepared_avatar, speech_pcm):
    counter = UnetCalls(models.unet, delay=0.05)
    proc = MuseTalkProcessor(models=models, avatar=prepared_avatar, settings=LiveSettings(latency_budget_s=60.0))
    try:
        frames = [SleepFrame(0.5), VADUserStartedSpeakingFrame(), *room_audio(speech_pcm[:32000]), InterruptionFrame(),
                  VADUserStoppedSpeakingFrame(), SleepFrame(1.0)]  # fmt: skip
        down = run(proc, frames)
    finally:
        counter.remove()
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    after = down[cut + 1 :]
    assert not any(type(f) is OutputAudioRawFrame for f in after)  # no queued speech audio survives
    loop_positions(prepared_avatar, images(after))  # only the idle loop: nothing generated shows up
    assert len(images(after)) >= 10


def test_speech_mode_lip_syncs_tts_audio_once(models, prepared_avatar, speech, frame_cost_s):
    pcm24 = (load_audio(speech, sample_rate=24000) * 32767).astype(np.int16)
    chunks = [
        TTSAudioRawFrame(pcm24[i : i + 2400].tobytes(), 24000, 1, context_id="c1") for i in range(0, len(pcm24), 2400)
    ]
    expected = -(-len(pcm24) // 960)
    settings = LiveSettings(mode="speech", latency_budget_s=budget_for(expected, frame_cost_s))
    proc = MuseTalkProcessor(models=models, avatar=prepared_avatar, settings=settings)
    down = run(proc, [SleepFrame(0.3), TTSStartedFrame(), *chunks, TTSStoppedFrame()])
    tts = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    synced = [f for f in images(down) if f.sync_with_audio]
    assert len(tts) == len(synced) == expected  # one 40 ms slice per frame, the original never passed on
    assert all(f.sample_rate == 24000 and len(f.audio) == 1920 and f.context_id == "c1" for f in tts)
    out = np.concatenate([np.frombuffer(f.audio, np.int16) for f in tts])
    np.testing.assert_array_equal(out[: len(pcm24)], pcm24)
    assert proc.stats().generated_frames == expected


def test_mirror_mode_passes_tts_audio_through(models, prepared_avatar):
    proc = MuseTalkProcessor(models=models, avatar=prepared_avatar)
    frame = TTSAudioRawFrame(bytes(1920), 24000, 1)
    down = run(proc, [frame])
    assert any(f is frame for f in down)


def test_slow_device_keeps_audio_flowing_and_says_so(models, prepared_avatar, speech_pcm):
    counter = UnetCalls(models.unet, delay=0.3)  # ~0.3 s per batch: far slower than 25 fps
    proc = MuseTalkProcessor(models=models, avatar=prepared_avatar, settings=LiveSettings(latency_budget_s=0.1))
    try:
        pcm = speech_pcm[:32000]
        paced = []
        for f in room_audio(pcm):
            paced += [f, SleepFrame(0.02)]  # real time, as a transport delivers it
        down = run(proc, [SleepFrame(0.8), VADUserStartedSpeakingFrame(), *paced, SleepFrame(0.5)])
    finally:
        counter.remove()
    stats = proc.stats()
    audio = [f for f in down if type(f) is OutputAudioRawFrame]
    assert len(audio) >= 40  # speech audio kept flowing
    assert stats.late_frames > 0 and not stats.realtime
    assert "real time needs 25" in stats.warning


def test_processors_share_an_injected_service_and_leave_it_when_done(models, prepared_avatar, speech_pcm, frame_cost_s):
    from musetalk.live.service import GenerationService, ServiceSettings

    service = GenerationService(models, ServiceSettings(admission=False))
    settings = LiveSettings(latency_budget_s=budget_for(2 * 13, frame_cost_s))  # both sessions' frames, one device
    procs = [
        MuseTalkProcessor(models=models, avatar=prepared_avatar, service=service, settings=settings) for _ in range(2)
    ]
    pcm = np.concatenate([speech_pcm[:8000], np.zeros(LOOKAHEAD_SAMPLES + 320, np.int16)])
    frames = [SleepFrame(0.3), VADUserStartedSpeakingFrame(), *room_audio(pcm)]

    async def both():
        return await asyncio.gather(*(run_test(p, frames_to_send=list(frames)) for p in procs))

    outputs = asyncio.run(both())
    for proc, (down, _) in zip(procs, outputs):
        assert proc.service is service
        assert proc.stats().generated_frames == 13 and proc.stats().late_frames == 0
        assert len([f for f in down if type(f) is OutputAudioRawFrame]) == 13
    stats = service.stats()
    assert stats.frames == 26 and stats.sessions == 0  # both sessions closed with their pipelines
