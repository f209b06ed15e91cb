"""Our generator against the official-loop reference (musetalk.bench.official), on tiny random models.

No timing assertions: these check bytes, order and where pixels may change.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest
import torch

from musetalk import accel
from musetalk.bench.official import OFFICIAL_BATCH, official_blend, official_decode, official_loop
from musetalk.bench.timing import psnr
from musetalk.generate import LipSyncGenerator, blend_face
from musetalk.latents import decode_latents, decode_latents_approx
from musetalk.testing import build_random_models, synthetic_avatar, synthetic_features

FRAMES = 10  # one full batch of 8, one partial batch of 2


@pytest.fixture(scope="module")
def tiny():
    return build_random_models(tiny=True, seed=3)


@pytest.fixture(scope="module")
def avatar():
    return synthetic_avatar(frames=5, seed=4)  # ping-pong cycle of 10: the loop wraps inside a run


@pytest.fixture(scope="module")
def features(tiny):
    return synthetic_features(FRAMES, tiny.audio_dim, seed=5)


@pytest.fixture(scope="module")
def reference(tiny, avatar, features):
    return official_loop(tiny, avatar, features, batch_size=OFFICIAL_BATCH)


@pytest.fixture(scope="module")
def plain_frames(tiny, avatar, features):
    return _generate(tiny, avatar, features)


@pytest.fixture(autouse=True)
def _restore_allocator():
    yield
    accel.keep_freed_memory(False)


def _generate(models, avatar, features, **kwargs):
    gen = LipSyncGenerator(models, avatar, batch_size=OFFICIAL_BATCH)
    try:
        return list(gen.generate(features, **kwargs))
    finally:
        gen.close()


def _assert_same(frames, reference):
    assert len(frames) == len(reference)
    for k, (a, b) in enumerate(zip(frames, reference)):
        assert a.dtype == np.uint8 and a.shape == b.shape
        diff = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
        assert diff == 0, f"frame {k}: max abs diff {diff}"


def test_plain_generator_is_byte_identical_to_official_loop(plain_frames, reference):
    _assert_same(plain_frames, reference)


@pytest.mark.parametrize("lean_blocks", [False, True])
def test_accelerated_generator_is_byte_identical_to_official_loop(tiny, avatar, features, reference, lean_blocks):
    fast = accel.optimize_for_inference(tiny, lean_blocks=lean_blocks, copy_modules=True)
    assert fast.unet is not tiny.unet and fast.vae is not tiny.vae
    assert fast.unet.conv_in.weight is tiny.unet.conv_in.weight  # weights shared, not copied
    _assert_same(_generate(fast, avatar, features), reference)
    # The reference modules were left as they were.
    assert all("forward" not in vars(m) for m in tiny.unet.modules())


def test_pixels_outside_crop_box_are_the_avatar_frame(avatar, plain_frames):
    changed_somewhere = False
    for pos, frame in enumerate(plain_frames):
        i = avatar.frame_index(pos)
        x0, y0, x1, y1 = (int(v) for v in avatar.crop_boxes[i])
        outside = np.ones(frame.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(frame[outside], avatar.frames[i][outside]), f"frame {pos} changed outside its crop box"
        changed_somewhere |= not np.array_equal(frame[y0:y1, x0:x1], avatar.frames[i][y0:y1, x0:x1])
    assert changed_somewhere


def test_overlap_pipeline_matches_synchronous_batches_in_order(tiny, avatar, features):
    start = 7  # not a batch multiple, and wraps around the 10-frame cycle; batches 4, 4, 2
    gen = LipSyncGenerator(tiny, avatar, batch_size=4)
    try:
        streamed = list(gen.generate(features, start_position=start))
        synchronous = []
        for s in range(0, FRAMES, 4):
            stop = min(s + 4, FRAMES)
            synchronous += gen.generate_batch(list(range(start + s, start + stop)), features[s:stop])
    finally:
        gen.close()
    _assert_same(streamed, synchronous)


def test_model_step_of_next_batch_overlaps_blending(tiny, avatar, features):
    """Blending batch 0 waits until the model step of batch 1 has started: only an overlapping
    pipeline can finish (a sequential one would time out here)."""
    gen = LipSyncGenerator(tiny, avatar, batch_size=4)
    second_batch_started = threading.Event()
    calls = {"infer": 0}
    plain_infer, plain_compose = gen.infer_faces, gen.compose
    blend_threads = set()

    def infer(positions, feats):
        calls["infer"] += 1
        if calls["infer"] == 2:
            second_batch_started.set()
        return plain_infer(positions, feats)

    def compose(position, face):
        blend_threads.add(threading.current_thread().name)
        if position == 0:
            assert second_batch_started.wait(timeout=60), "batch 1's model step never ran while batch 0 was blending"
        return plain_compose(position, face)

    gen.infer_faces, gen.compose = infer, compose
    try:
        frames = list(gen.generate(features[:8]))
    finally:
        gen.close()
    assert len(frames) == 8
    assert blend_threads and all(name.startswith("musetalk-blend") for name in blend_threads)


def test_decode_latents_is_the_official_decode(tiny):
    z = torch.randn(3, 4, 32, 32, generator=torch.Generator().manual_seed(6))
    ours = decode_latents(tiny.vae, z)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 256, 256, 3) and ours.is_contiguous()
    assert np.array_equal(ours.numpy(), official_decode(tiny.vae, z))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crop_only_blend_equals_full_frame_pil_blend(seed):
    rng = np.random.default_rng(seed)
    avatar = synthetic_avatar(frames=1, seed=seed)
    frame, mask = avatar.frames[0], avatar.masks[0]
    box, crop = avatar.boxes[0], avatar.crop_boxes[0]
    face = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    x0, y0, x1, y1 = (int(v) for v in box)
    expected = official_blend(frame, cv2.resize(face, (x1 - x0, y1 - y0)), box, crop, mask)
    assert np.array_equal(blend_face(frame, face, box, crop, mask), expected)


def test_crop_only_blend_at_frame_edge():
    """A face at the frame's corner: the crop box is clamped and no longer square."""
    from musetalk.face.box import crop_box

    rng = np.random.default_rng(9)
    frame = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    box = (0, 5, 90, 120)
    crop = crop_box(box, (320, 240))
    mask = rng.integers(0, 256, (crop[3] - crop[1], crop[2] - crop[0]), dtype=np.uint8)
    face = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    expected = official_blend(frame, cv2.resize(face, (90, 115)), box, crop, mask)
    assert np.array_equal(blend_face(frame, face, box, crop, mask), expected)


def test_lean_blocks_are_exact_and_leave_autograd_alone(tiny):
    lean = accel.module_copy_sharing_weights(tiny.vae)
    assert accel.use_lean_blocks(lean.decoder) > 0
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        assert torch.equal(lean.decode(z).sample, tiny.vae.decode(z).sample)
    with torch.no_grad():
        assert torch.equal(lean.decode(z).sample, tiny.vae.decode(z).sample)
    with torch.enable_grad():  # training-style call: the original forward runs
        x = torch.randn(1, 4, 32, 32, requires_grad=True)
        lean.decode(x).sample.sum().backward()
        assert x.grad is not None


def test_keep_freed_memory_toggles():
    if not accel.allocator_tunable():
        pytest.skip("not a glibc process")
    assert accel.keep_freed_memory(True) and accel.memory_kept()
    assert accel.keep_freed_memory(False) and not accel.memory_kept()


def test_opt_in_approximate_decode(tiny, avatar, features):
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(8))
    exact = decode_latents(tiny.vae, z).numpy()
    approx = decode_latents_approx(tiny.vae, z).numpy()
    assert approx.shape == exact.shape and approx.dtype == np.uint8
    value = psnr(approx, exact)
    assert value is None or value > 30  # None: no bf16 on this CPU, the decode is the exact one
    # The accel switch decodes exactly like decode_latents_approx.
    fast = accel.optimize_for_inference(tiny, approx_decode=True, copy_modules=True)
    assert np.array_equal(decode_latents(fast.vae, z).numpy(), approx)
    assert tiny.vae.decoder.__class__.__name__ == "Decoder"  # original untouched
