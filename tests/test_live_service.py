"""The shared generation service: cross-session batches, fairness, faults, admission (tiny models, CPU)."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from musetalk.errors import CapacityError
from musetalk.generate import LipSyncGenerator
from musetalk.live.requests import FrameItem, FrameRequest
from musetalk.live.service import GenerationService, ServiceSettings
from musetalk.testing import synthetic_avatar, synthetic_features


class Results:
    """A session's sink: collects images by seq; can be told to crash."""

    def __init__(self, crash: bool = False):
        self.images: dict[int, np.ndarray] = {}
        self.skipped: list[int] = []
        self.errors: list[str] = []
        self.calls = 0
        self.crash = crash
        self.changed = threading.Condition()

    def __call__(self, result) -> None:
        with self.changed:
            self.calls += 1
            self.images.update(result.images)
            self.skipped += result.skipped
            if result.error:
                self.errors.append(result.error)
            self.changed.notify_all()
        if self.crash:
            raise RuntimeError("this session's consumer crashed")

    def wait_for(self, seqs, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not all(s in self.images for s in seqs):
                left = deadline - time.monotonic()
                assert left > 0, f"frames {sorted(set(seqs) - set(self.images))} never arrived"
                self.changed.wait(left)

    def wait(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.images) + len(self.skipped) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"only {len(self.images)} of {n} frames arrived"
                self.changed.wait(left)


def renamed(avatar, name):
    return dataclasses.replace(avatar, manifest=dataclasses.replace(avatar.manifest, name=name))


@pytest.fixture(scope="module")
def avatars():
    return [
        renamed(synthetic_avatar(frames=3, size=(192, 160), face_box=(60, 30, 140, 120), seed=s), f"av{s}")
        for s in range(4)
    ]


def request(session_id, seqs, features, *, positions=None, due=None):
    due = time.monotonic() + 60.0 if due is None else due
    positions = positions or list(seqs)
    items = tuple(FrameItem(seq=s, frame=s, position=p, due=due) for s, p in zip(seqs, positions))
    return FrameRequest(session_id=session_id, items=items, features=np.asarray(features))


def service(models, **kw):
    kw.setdefault("blend_threads", 1)
    kw.setdefault("admission", False)
    return GenerationService(models, ServiceSettings(batch_size=4, **kw))


def run_alone(models, avatar, seqs, features, **kw):
    svc = service(models, gather_s=0.05)
    svc.open_session("a", svc.add_avatar(avatar), sink := Results(), warm_up=False)
    svc.submit(request("a", seqs, features, **kw))
    sink.wait(len(seqs))
    sizes = svc.stats().batch_sizes
    svc.close()
    return sink.images, sizes


def test_mixed_batch_frames_equal_single_session_frames(models, avatars):
    feats_a = synthetic_features(4, models.audio_dim, seed=1).numpy()
    feats_b = synthetic_features(2, models.audio_dim, seed=2).numpy()
    mixed = service(models, gather_s=1.0)  # the batch waits until all 4 frames are queued
    ids = [mixed.add_avatar(a) for a in avatars[:2]]
    a, b = Results(), Results()
    mixed.open_session("a", ids[0], a, warm_up=False)
    mixed.open_session("b", ids[1], b, warm_up=False)
    with mixed._cond:  # both queued before the worker looks
        mixed.submit(request("a", [0, 1], feats_a[:2]))
        mixed.submit(request("b", [0, 1], feats_b, positions=[3, 4]))
    a.wait(2)
    b.wait(2)
    assert mixed.stats().batch_sizes == {4: 1}  # one batch, two sessions, two avatars
    mixed.close()

    # Same batch size, the other rows from the same session: the same bytes (rows are independent).
    solo4, sizes = run_alone(models, avatars[0], [0, 1, 2, 3], feats_a)
    assert sizes == {4: 1}
    for seq in (0, 1):
        np.testing.assert_array_equal(a.images[seq], solo4[seq])
    gen = LipSyncGenerator(models, avatars[1], batch_size=4)
    try:  # ... and the offline generator's frames at that batch size
        ref = gen.generate_batch([3, 4, 0, 1], torch.from_numpy(np.concatenate([feats_b, feats_a[:2]])))
    finally:
        gen.close()
    for seq in (0, 1):
        np.testing.assert_array_equal(b.images[seq], ref[seq])
    # Another batch size (2 here) picks other CPU kernels: float rounding flips a few pixels by 1-2 levels.
    solo2, sizes = run_alone(models, avatars[0], [0, 1], feats_a[:2])
    assert sizes == {2: 1}
    for seq in (0, 1):
        diff = np.abs(a.images[seq].astype(int) - solo2[seq].astype(int))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.001


def test_whisper_windows_of_several_sessions_encode_together(models, avatars):
    from musetalk.audio import AudioFeatureEncoder, StreamingAudioFeatures

    enc = AudioFeatureEncoder(models.whisper, models.feature_extractor, models.device, models.dtype)
    svc = service(models)
    rng = np.random.default_rng(0)
    windows = []
    for k in range(3):
        stream = StreamingAudioFeatures()
        stream.push((rng.standard_normal(16000 + 3200 * k) * 0.1).astype(np.float32))
        windows.append(stream.request((5, 9)))
    together = svc.encoder.encode([w.window for w in windows])
    for w, feats in zip(windows, together):
        from musetalk.audio import windows_from_features

        alone = svc.encoder.encode([w.window])[0]
        np.testing.assert_array_equal(windows_from_features(alone, w.first_feature, w.frames), w.compute(enc))
        # In one batched pass the log-mel and encoder run at batch 3: equal within float rounding.
        torch.testing.assert_close(feats, alone, rtol=1e-4, atol=1e-4)


def test_faults_of_some_sessions_leave_the_others_unaffected(models, avatars):
    svc = service(models, gather_s=0.01)
    ids = [svc.add_avatar(a) for a in avatars]  # four avatars, one per session
    healthy, interrupted, stopped, crashing = Results(), Results(), Results(), Results(crash=True)
    for name, sink, avatar_id in zip("hisc", (healthy, interrupted, stopped, crashing), ids):
        svc.open_session(name, avatar_id, sink)
    n = 24
    feats = synthetic_features(n, models.audio_dim, seed=7).numpy()
    for k in range(0, n, 2):  # four sessions speaking at once, two frames per request
        for name in "hisc":
            svc.submit(request(name, [k, k + 1], feats[k : k + 2]))
        if k == 8:
            svc.cancel("i")  # interrupted: its queued frames go
            svc.close_session("s")  # stopped mid-utterance
    healthy.wait(n)
    assert sorted(healthy.images) == list(range(n)) and not healthy.errors and not healthy.skipped
    assert "c" not in svc._sessions and crashing.calls >= 1  # the crashing consumer was closed, only it
    assert len(stopped.images) < n
    interrupted.wait_for(range(10, n))  # speaks again after the interruption
    stats = svc.stats()
    assert stats.sessions == 2 and stats.errors >= 1
    # The healthy session's frames are the frames it gets alone, up to the float rounding of other
    # batch sizes (a few pixels by one level): the other sessions only changed who shared its batches.
    alone = service(models, gather_s=0.01)
    alone.open_session("h", alone.add_avatar(avatars[0]), solo := Results())
    for k in range(0, n, 2):
        alone.submit(request("h", [k, k + 1], feats[k : k + 2]))
    solo.wait(n)
    for seq in range(n):
        diff = np.abs(healthy.images[seq].astype(int) - solo.images[seq].astype(int))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.001
    svc.close()
    alone.close()


def test_a_busy_session_cannot_starve_another(models, avatars):
    svc = service(models, gather_s=0.2)
    ids = [svc.add_avatar(a) for a in avatars[:2]]
    order: list[str] = []
    talker, quiet = Results(), Results()
    svc.open_session("talker", ids[0], lambda r: (order.append("t"), talker(r)), warm_up=False)
    svc.open_session("quiet", ids[1], lambda r: (order.append("q"), quiet(r)), warm_up=False)
    feats = synthetic_features(24, models.audio_dim, seed=3).numpy()
    due = time.monotonic() + 60
    with svc._cond:  # both queued before the worker can form a batch
        svc.submit(request("talker", list(range(20)), feats[:20], due=due))  # a long burst, queued first
        svc.submit(request("quiet", [0, 1, 2, 3], feats[20:], due=due + 0.001))
    quiet.wait(4)
    talker.wait(20)
    assert order.index("q") <= 1 and order[:4].count("q") == 2  # half of each of the first two batches
    svc.close()


def test_admission_refuses_a_session_past_capacity(models, avatars):
    slow = models.unet.register_forward_pre_hook(lambda module, args: time.sleep(0.25))
    try:
        svc = GenerationService(models, ServiceSettings(batch_size=4, blend_threads=1))
        avatar_id = svc.add_avatar(avatars[0])
        cost = svc.calibrate(avatar_id)
    finally:
        slow.remove()
    assert cost > 0.25 / 4 and svc.capacity() == 0
    svc.open_session("first", avatar_id, Results(), warm_up=False)  # a device too slow for one still serves one
    with pytest.raises(CapacityError, match=r"This device serves 1 sessions at 25 fps; 1 are running"):
        svc.open_session("second", avatar_id, Results(), warm_up=False)
    assert svc.stats().capacity_left == 0
    svc.close_session("first")
    svc.open_session("second", avatar_id, Results(), warm_up=False)  # closing frees the place
    svc.close()
    capped = GenerationService(models, ServiceSettings(max_sessions=2, admission=False))
    avatar_id = capped.add_avatar(avatars[0])
    capped.open_session("1", avatar_id, Results(), warm_up=False)
    capped.open_session("2", avatar_id, Results(), warm_up=False)
    with pytest.raises(CapacityError, match="serves 2 sessions"):
        capped.open_session("3", avatar_id, Results(), warm_up=False)
    capped.close()


def test_frames_that_cannot_be_ready_in_time_are_given_up(models, avatars):
    svc = service(models, gather_s=0.01)
    avatar_id = svc.add_avatar(avatars[0])
    svc.calibrate(avatar_id)
    sink = Results()
    svc.open_session("late", avatar_id, sink, warm_up=False)
    feats = synthetic_features(8, models.audio_dim, seed=1).numpy()
    svc.submit(request("late", list(range(8)), feats, due=time.monotonic() - 1.0))  # already due
    sink.wait(8)
    # All given up, except at most one full batch that keeps the estimate fresh (if it is over 1 s old).
    assert len(sink.skipped) + len(sink.images) == 8 and len(sink.skipped) >= 4
    assert svc.stats().skipped_frames == len(sink.skipped)
    svc.close()


def test_the_worker_ends_when_the_last_session_closes(models, avatars):
    svc = service(models)
    avatar_id = svc.add_avatar(avatars[0])
    before = threading.active_count()
    for k in range(5):
        svc.open_session(f"s{k}", avatar_id, Results())
        svc.close_session(f"s{k}")
    deadline = time.monotonic() + 10
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before


def test_the_speed_estimate_recovers_when_the_device_gets_faster(models, avatars):
    svc = service(models, gather_s=0.01)
    avatar_id = svc.add_avatar(avatars[0])
    slow = models.unet.register_forward_pre_hook(lambda module, args: time.sleep(1.0))
    try:
        svc.calibrate(avatar_id, repeats=1)
    finally:
        slow.remove()
    slow_cost = svc.frame_cost()
    sink = Results()
    svc.open_session("s", avatar_id, sink, warm_up=False)
    feats = synthetic_features(4, models.audio_dim, seed=2).numpy()
    seq = 0
    deadline = time.monotonic() + 30
    while svc.frame_cost() >= 0.9 * slow_cost and time.monotonic() < deadline:
        # Frames due in 0.15 s look hopeless to the slow estimate; full probe batches keep measuring.
        svc.submit(request("s", list(range(seq, seq + 4)), feats, due=time.monotonic() + 0.15))
        seq += 4
        time.sleep(0.1)
    assert svc.frame_cost() < 0.9 * slow_cost, "the estimate stayed at the slow figure"
    assert sink.images  # the probes were real batches of the session's newest frames
    svc.close()
