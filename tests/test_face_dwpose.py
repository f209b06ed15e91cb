"""DWPose landmarks: the official top-down preprocessing, flip test and SimCC decoding, by hand."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from tiny_dwpose import peaks, write_random_dwpose, write_symmetric_face_dwpose, write_wrong_shape_dwpose

from musetalk.config import ModelPaths
from musetalk.errors import MissingWeightsError
from musetalk.face.dwpose import (
    FACE_FIRST,
    FACE_MIRROR,
    MEAN,
    STD,
    DWPose,
    decode_simcc,
    dwpose_path,
    flip_average,
    frame_box_center_scale,
    preprocess,
    to_frame,
    warp_matrix,
)

K, WX, WY = 133, 576, 768
# A 640x480 frame: centre (320, 240); box 640x480 x 1.25 = 800x600, widened... no: heightened to
# 3:4 -> 800 x 1066.67. Input pixel x -> frame x * 800/288 - 80; y -> y * 1066.67/384 - 293.33.
FRAME_W, FRAME_H = 640, 480
SX = 800 / 288
SY = (800 / 0.75) / 384


def frame_point(bx: float, by: float) -> tuple[float, float]:
    """Frame pixels of SimCC bins (bx, by), from the formulas above."""
    return bx / 2 * SX + 320 - 400, by / 2 * SY + 240 - 800 / 0.75 / 2


def test_face_mirror_is_the_ibug_left_right_swap():
    m = FACE_MIRROR
    assert len(m) == 68 and all(m[m[k]] == k for k in range(68))
    assert (m[0], m[16], m[8], m[3]) == (16, 0, 8, 13)  # jaw ends swap, chin stays
    assert (m[17], m[21], m[22]) == (26, 22, 21)  # brows
    assert [m[k] for k in (27, 28, 29, 30, 33)] == [27, 28, 29, 30, 33]  # nose midline
    assert (m[31], m[32]) == (35, 34)
    assert (m[36], m[39], m[40], m[41]) == (45, 42, 47, 46)  # eyes: corners and lids
    assert (m[48], m[49], m[51], m[55], m[57]) == (54, 53, 51, 59, 57)  # outer lips
    assert (m[60], m[61], m[62], m[65], m[66]) == (64, 63, 62, 67, 66)  # inner lips
    # as whole-body keypoint ids (face = 23..90): 23 <-> 39, 59 (eye 36) <-> 68 (eye 45)
    assert FACE_FIRST + m[0] == 39 and FACE_FIRST + m[36] == 68


@pytest.mark.parametrize(
    ("size", "centre", "scale"),
    [
        ((640, 480), (320, 240), (800, 800 / 0.75)),  # wide: 800 x 600 heightened to 3:4
        ((400, 800), (200, 400), (750, 1000)),  # tall: 500 x 1000 widened to 3:4
        ((480, 640), (240, 320), (600, 800)),  # exactly 3:4 after padding
    ],
)
def test_whole_frame_box_centre_and_scale(size, centre, scale):
    c, s = frame_box_center_scale(*size)
    np.testing.assert_allclose(c, centre)
    np.testing.assert_allclose(s, scale, rtol=1e-6)


def test_warp_maps_the_frame_centre_to_the_input_centre():
    c, s = frame_box_center_scale(FRAME_W, FRAME_H)
    m = warp_matrix(c, s)
    k = 288 / 800
    np.testing.assert_allclose(m, [[k, 0, 144 - 320 * k], [0, k, 192 - 240 * k]], atol=1e-4)


def test_preprocess_normalises_rgb_and_pads_black():
    frame = np.empty((FRAME_H, FRAME_W, 3), np.uint8)
    frame[:] = (200, 100, 50)
    x, centre, scale = preprocess(frame)
    assert x.shape == (1, 3, 384, 288) and x.dtype == np.float32
    colour = (np.array([200, 100, 50], np.float32) - MEAN) / STD
    black = -MEAN / STD
    # the frame covers input x 28.8 .. 259.2 and y 105.6 .. 278.4 (scale 0.36 about the centre)
    np.testing.assert_allclose(x[0, :, 200, 100], colour, rtol=1e-6)
    np.testing.assert_allclose(x[0, :, 110, 30], colour, rtol=1e-6)
    np.testing.assert_allclose(x[0, :, 200, 27], black, rtol=1e-6)  # left of the frame
    np.testing.assert_allclose(x[0, :, 104, 100], black, rtol=1e-6)  # above it
    np.testing.assert_allclose(x[0, :, 280, 100], black, rtol=1e-6)  # below it


def test_preprocess_puts_a_frame_pixel_where_the_affine_says():
    frame = np.zeros((FRAME_H, FRAME_W, 3), np.uint8)
    frame[350:370, 100:120] = 255  # a 20x20 white square centred on frame (110, 360)
    x, _, _ = preprocess(frame)
    ys, xs = np.nonzero(x[0, 0] > 0)
    # (110, 360) -> input (144 + (110 - 320) * 0.36, 192 + (360 - 240) * 0.36) = (68.4, 235.2)
    assert abs(xs.mean() - 68.4) < 0.6 and abs(ys.mean() - 235.2) < 0.6


def test_flip_average_by_hand():
    direct_x = np.array([[0, 1, 0, 0], [0, 0, 0, 2]], np.float32)
    flip_x = np.array([[4, 0, 0, 0], [0, 0, 6, 0]], np.float32)
    direct_y = np.array([[1, 0], [0, 1]], np.float32)
    flip_y = np.array([[0, 3], [5, 0]], np.float32)
    ax, ay = flip_average(direct_x, direct_y, flip_x, flip_y, np.array([1, 0]))
    # keypoint 0 takes the mirrored pass's keypoint 1, reversed along x: [0, 6, 0, 0]
    # keypoint 1 takes keypoint 0 reversed: [0, 0, 0, 4]
    np.testing.assert_allclose(ax, [[0, 3.5, 0, 0], [0, 0, 0, 3]])
    np.testing.assert_allclose(ay, [[3, 0], [0, 2]])


def test_decoding_synthetic_peaks_lands_within_half_a_pixel():
    """Peaks put at known bins, the mirrored pass consistent with them (as a mirrored image gives),
    come back at the frame points the bins stand for."""
    rng = np.random.default_rng(1)
    bx = rng.integers(0, WX, 68)
    by = rng.integers(0, WY, 68)
    mirror = np.asarray(FACE_MIRROR)
    direct_x, direct_y = peaks(bx, WX), peaks(by, WY)
    # the mirrored image's keypoint j is the original's mirror[j], at x-bin 575 - its bin
    flip_x, flip_y = peaks(575 - bx[mirror], WX), peaks(by[mirror], WY)
    ax, ay = flip_average(direct_x, direct_y, flip_x, flip_y, mirror)
    points, scores = decode_simcc(ax, ay)
    np.testing.assert_array_equal(points, np.stack([bx, by], 1) / 2.0)
    assert (scores > 0.99).all()
    c, s = frame_box_center_scale(FRAME_W, FRAME_H)
    got = to_frame(points, c, s)
    want = np.array([frame_point(x, y) for x, y in zip(bx, by)])
    assert np.abs(got - want).max() < 0.5
    assert np.abs(got - want).max() < 1e-3  # only float32 rounding


def test_a_keypoint_without_a_positive_score_decodes_to_bin_minus_one():
    sx = np.full((2, WX), -1.0, np.float32)
    sy = np.full((2, WY), -1.0, np.float32)
    sx[0, 100] = sy[0, 200] = 0.8
    sx[1, 50] = 0.5  # y never positive -> score <= 0
    points, scores = decode_simcc(sx, sy)
    np.testing.assert_array_equal(points, [[50, 100], [-0.5, -0.5]])
    np.testing.assert_allclose(scores, [0.8, -1.0])


@pytest.fixture(scope="module")
def symmetric_model(tmp_path_factory):
    """Constant network: face keypoints of a symmetric face, other keypoints weaker."""
    root = tmp_path_factory.mktemp("models-dwpose")
    bx, by = write_symmetric_face_dwpose(dwpose_path(root))
    return root, bx, by


def test_onnx_model_end_to_end(symmetric_model):
    root, bx, by = symmetric_model
    model = DWPose.from_file(dwpose_path(root))
    frame = np.random.default_rng(0).integers(0, 255, (FRAME_H, FRAME_W, 3), dtype=np.uint8)
    lm, scores = model.keypoints(frame)
    want = np.array([frame_point(x, y) for x, y in zip(bx, by)])
    assert lm.shape == (68, 2) and lm.dtype == np.float32
    assert np.abs(lm - want).max() < 0.5
    np.testing.assert_array_equal(model.landmarks68(frame), lm)


def test_tiny_random_network_runs(tmp_path):
    path = write_random_dwpose(dwpose_path(tmp_path))
    model = DWPose.from_file(path)
    frame = np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)
    lm = model.landmarks68(frame)
    assert lm.shape == (68, 2) and np.isfinite(lm).all()
    # every point decodes inside the padded box around the frame (or at bin -1)
    c, s = frame_box_center_scale(200, 300)
    assert (lm >= c - s / 2 - 1).all() and (lm <= c + s / 2).all()


def test_wrong_shaped_file_names_it_and_the_fetch_command(tmp_path):
    path = write_wrong_shape_dwpose(dwpose_path(tmp_path))
    with pytest.raises(MissingWeightsError) as err:
        DWPose.from_file(path)
    text = str(err.value)
    assert str(path) in text and "384" in text and "download_weights.sh" in text


def test_damaged_file_names_it_and_the_fetch_command(tmp_path):
    path = dwpose_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(MissingWeightsError) as err:
        DWPose.from_file(path)
    assert str(path) in str(err.value) and "download_weights.sh" in str(err.value)
    assert "\n" in str(err.value) and "Traceback" not in str(err.value)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(MissingWeightsError, match="dw-ll_ucoco_384.onnx is missing"):
        DWPose.from_file(dwpose_path(tmp_path))


def test_model_paths_know_where_dwpose_lives(tmp_path):
    assert ModelPaths(tmp_path).dwpose == tmp_path / "dwpose" / "dw-ll_ucoco_384.onnx" == dwpose_path(tmp_path)


def test_landmark_choice(models, tmp_path, symmetric_model):
    from musetalk.avatar.prepare import landmark_model

    root, _, _ = symmetric_model
    # the session's tiny model set has no DWPose file: auto falls back, dwpose is refused
    assert landmark_model(models, "auto") is None
    with pytest.raises(MissingWeightsError, match="dw-ll_ucoco_384.onnx is missing"):
        landmark_model(models, "dwpose")
    with_dwpose = replace(models, paths=ModelPaths(root))
    assert isinstance(landmark_model(with_dwpose, "auto"), DWPose)
    assert landmark_model(with_dwpose, "offline") is None
    # a damaged file: one clear error naming it, the fetch command and the offline choice
    broken = tmp_path / "broken"
    dwpose_path(broken).parent.mkdir(parents=True)
    dwpose_path(broken).write_bytes(b"not onnx")
    with pytest.raises(MissingWeightsError) as err:
        landmark_model(replace(models, paths=ModelPaths(broken)), "auto")
    assert str(dwpose_path(broken)) in str(err.value) and "--landmarks offline" in str(err.value)
    assert landmark_model(replace(models, paths=ModelPaths(broken)), "offline") is None


def test_points_on_whole_pixels_truncate_to_them():
    """1920x1080: scale 2400 x 3200, so bin b is frame x = b * 25/6 - 240 and y = b * 25/6 - 1060:
    every bin divisible by 6 lands on a whole pixel, which the int32 cast must keep."""
    c, s = frame_box_center_scale(1920, 1080)
    np.testing.assert_allclose(s, (2400, 3200))
    bins = np.arange(0, 576, 6)
    points = np.stack([bins / 2, (bins + 192) / 2], axis=1).astype(np.float32)
    got = to_frame(points, c, s).astype(np.int32)
    np.testing.assert_array_equal(got[:, 0], bins * 25 // 6 - 240)
    np.testing.assert_array_equal(got[:, 1], (bins + 192) * 25 // 6 - 1060)
