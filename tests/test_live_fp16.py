"""The GPU's half-precision path on CPU: tiny models in float16 end to end through the service.

CUDA runs MuseTalk in float16; these run the same code in float16 on the CPU so a dtype bug
(a missing cast, a clamp in the wrong type, features left in float32) fails here, without a GPU.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from musetalk.audio import StreamingAudioFeatures
from musetalk.live.requests import FrameItem, FrameRequest
from musetalk.live.service import GenerationService, ServiceSettings
from musetalk.testing import build_random_models, synthetic_avatar


@pytest.fixture(scope="module")
def avatar():
    a = synthetic_avatar(frames=3, size=(192, 160), face_box=(60, 30, 140, 120), seed=2)
    return dataclasses.replace(a, manifest=dataclasses.replace(a.manifest, name="fp16"))


def frames_through_service(models, avatar, window: FrameRequest):
    got: dict = {}
    svc = GenerationService(models, ServiceSettings(batch_size=4, admission=False, blend_threads=1))
    try:
        svc.open_session("s", svc.add_avatar(avatar), lambda r: got.setdefault("r", []).append(r), warm_up=True)
        svc.submit(window)
        deadline = time.monotonic() + 120
        while sum(len(r.images) + len(r.skipped) for r in got.get("r", [])) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        results = got.get("r", [])
        assert not [r.error for r in results if r.error]
        images = {k: v for r in results for k, v in r.images.items()}
        feats = svc.encoder.encode([window.window])[0]
        return images, feats
    finally:
        svc.close()


@pytest.mark.slow  # two model sets, two services
def test_half_precision_on_cpu_matches_float32_closely(avatar):
    rng = np.random.default_rng(0)
    stream = StreamingAudioFeatures()
    stream.push((rng.standard_normal(24000) * 0.2).astype(np.float32))
    snap = stream.request(())
    items = tuple(FrameItem(seq=k, frame=10 + k, position=k, due=time.monotonic() + 600) for k in range(4))
    request = FrameRequest("s", items, window=snap.window, first_feature=snap.first_feature)

    half = build_random_models(tiny=True, dtype=torch.float16, seed=11)
    full = build_random_models(tiny=True, dtype=torch.float32, seed=11)
    assert half.unet.dtype == torch.float16 and half.whisper.dtype == torch.float16 and half.vae.dtype == torch.float16
    images16, feats16 = frames_through_service(half, avatar, request)
    images32, feats32 = frames_through_service(full, avatar, request)

    assert feats16.dtype == torch.float32 and torch.isfinite(feats16).all()  # features leave whisper as float32
    assert (feats16 - feats32).abs().max() < 0.05 * feats32.abs().max()
    assert sorted(images16) == [0, 1, 2, 3]
    for k in range(4):
        a, b = images16[k], images32[k]
        assert a.dtype == np.uint8 and a.shape == (160, 192, 3)
        frame = avatar.frames[avatar.frame_index(k)]
        cx0, cy0, cx1, cy1 = avatar.crop_boxes[avatar.frame_index(k)]
        outside = np.ones(a.shape[:2], bool)
        outside[cy0:cy1, cx0:cx1] = False
        assert np.array_equal(a[outside], frame[outside])  # only the crop is touched, in any precision
        assert not np.array_equal(a, frame)  # the mouth region was generated
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.mean() < 2.0 and diff.max() <= 40  # fp16 rounding, not a broken cast (that gives 0/255 blocks)
