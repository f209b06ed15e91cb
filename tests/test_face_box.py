"""MuseTalk v1.5 face-box arithmetic, checked against boxes computed by hand."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from musetalk.errors import ConfigError, NoFaceError
from musetalk.face import bbox_shift_range, crop_box, face_box, mask_line_y, nearest_good
from musetalk.face.box import crop_half_size, cut_square, square_crop_box

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def landmarker():
    from musetalk.face import FaceLandmarker

    models = Path(os.environ.get("MUSETALK_MODELS_DIR", REPO / "models"))
    if not (models / "face-landmarks" / "face_landmark.tflite").is_file():
        pytest.skip(f"face models not fetched into {models}/face-landmarks: run python scripts/fetch_face_models.py")
    return FaceLandmarker.from_pretrained(models / "face-landmarks")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


def synthetic_lm68(nose28: float = 120.0, nose29: float = 130.0, nose30: float = 140.0) -> np.ndarray:
    """(68, 2) float32 landmarks: x spans 100..200, chin (8) lowest at y 200."""
    lm = np.zeros((68, 2), dtype=np.float32)
    lm[:, 0] = np.linspace(100, 200, 68)
    lm[:, 1] = 150.0
    lm[0] = (100, 110)
    lm[16] = (200, 110)
    lm[8] = (150, 200)
    lm[28] = (150, nose28)
    lm[29] = (150, nose29)
    lm[30] = (150, nose30)
    return lm


def test_box_by_hand_without_shift():
    # c = 130, half = 200 - 130 = 70, top = 60; bottom = 200 + 10 margin
    assert face_box(synthetic_lm68(), 0, 10, (400, 300)) == (100, 60, 200, 210)


def test_centre_line_sits_on_landmark_29_and_moves_with_bbox_shift():
    lm = synthetic_lm68()
    for shift in (-9, -3, 0, 4, 11):
        box = face_box(lm, shift, 0, (400, 300))
        # without margin the centre line is exactly the shifted landmark 29
        assert mask_line_y(box) == 130 + shift
        assert (box[1] + box[3]) / 2 == 130 + shift
    # c = 137, half = 63, top = 74
    assert face_box(lm, 7, 0, (400, 300)) == (100, 74, 200, 200)


def test_extra_margin_lowers_the_centre_line_by_half_the_margin():
    box = face_box(synthetic_lm68(), 0, 10, (400, 300))
    assert mask_line_y(box) == 130 + 5


def test_truncates_landmarks_before_the_arithmetic():
    """The official casts landmarks to int32 (129.6 -> 129), where rounding would give 130."""
    lm = synthetic_lm68(nose29=129.6)
    lm[8, 1] = 200.9
    lm[0, 0] = 100.7
    lm[:, 0] = np.minimum(lm[:, 0], 199.99)  # right-most points at 199.99
    # c = 129 (not 130), chin = 200 (not 201) -> half 71, top 58 (rounding: c 130, chin 201 -> top 59)
    # x: min 100 (100.7 truncated; rounding 101), max 199 (199.99; rounding 200)
    assert face_box(lm, 0, 0, (400, 300)) == (100, 58, 199, 200)


def test_top_clamps_at_frame_top():
    lm = synthetic_lm68(nose28=30, nose29=40, nose30=50)
    # c = 40, half = 160, top = -120 -> 0
    assert face_box(lm, 0, 0, (400, 300)) == (100, 0, 200, 200)


def test_extra_margin_clamps_at_frame_bottom():
    lm = synthetic_lm68()
    assert face_box(lm, 0, 10, (400, 205)) == (100, 60, 200, 205)
    assert face_box(lm, 0, 10, (400, 200)) == (100, 60, 200, 200)


def test_x_clamps_to_frame():
    lm = synthetic_lm68()
    lm[0, 0] = -12.0
    lm[16, 0] = 250.0
    assert face_box(lm, 0, 0, (230, 300)) == (0, 60, 230, 200)


def test_shift_below_the_chin_is_refused():
    with pytest.raises(ConfigError, match="bbox_shift"):
        face_box(synthetic_lm68(), 70, 10, (400, 300))


def test_wrong_landmark_shape_is_refused():
    with pytest.raises(ValueError, match="68, 2"):
        face_box(np.zeros((5, 2)), 0, 0, (10, 10))


def test_bbox_shift_range_means_over_frames():
    a = synthetic_lm68(nose28=120, nose29=130, nose30=138)  # up 10, down 8
    b = synthetic_lm68(nose28=118, nose29=130, nose30=140)  # up 12, down 10
    # down mean 9 -> -9; up mean 11 -> +11; frames without a face are ignored
    assert bbox_shift_range([a, None, b]) == (-9, 11)


def test_bbox_shift_range_truncates():
    a = synthetic_lm68(nose28=119.4, nose29=130, nose30=137.3)
    assert bbox_shift_range([a]) == (-7, 11)
    # landmarks truncated first: 29 at 130.9 -> 130, 30 at 139.95 -> 139, 28 at 120.99 -> 120
    b = synthetic_lm68(nose28=120.99, nose29=130.9, nose30=139.95)
    assert bbox_shift_range([b]) == (-9, 10)
    # means truncated toward zero: down (9 + 10) / 2 = 9.5 -> 9, up (11 + 12) / 2 = 11.5 -> 11
    c = synthetic_lm68(nose28=119, nose29=130, nose30=139)
    d = synthetic_lm68(nose28=118, nose29=130, nose30=140)
    assert bbox_shift_range([c, d]) == (-9, 11)


def test_bbox_shift_range_without_faces():
    with pytest.raises(NoFaceError):
        bbox_shift_range([None, None])


def test_crop_box_is_square_around_the_box_centre():
    box = (100, 60, 200, 210)  # w 100, h 150 -> half side int(150 // 2 * 1.5) = int(112.5) = 112
    crop = crop_box(box, (400, 300))
    assert crop == (150 - 112, 135 - 112, 150 + 112, 135 + 112)
    assert crop[2] - crop[0] == crop[3] - crop[1]


@pytest.mark.parametrize(
    ("w", "h", "half"),
    [
        (100, 150, 112),  # 150 // 2 = 75 -> 112.5 -> 112
        (103, 40, 76),  # 103 // 2 = 51 -> 76.5 -> 76 (1.5 * 103 / 2 = 77.25 would give 77)
        (40, 107, 79),  # 107 // 2 = 53 -> 79.5 -> 79 (80.25 would give 80)
        (101, 101, 75),  # 50 -> 75.0; here both formulas agree
        (2, 1, 1),
    ],
)
def test_crop_half_size_halves_first(w, h, half):
    assert crop_half_size(w, h) == half
    x0, y0 = 300, 300
    sq = square_crop_box((x0, y0, x0 + w, y0 + h))
    assert sq[2] - sq[0] == 2 * half and sq[3] - sq[1] == 2 * half


def test_crop_box_is_cut_at_the_frame_edges_and_keeps_the_face_box():
    box = (0, 0, 50, 80)  # centre (25, 40), half side 60
    crop = crop_box(box, (400, 300))
    assert crop == (0, 0, 85, 100)
    assert crop[0] <= box[0] and crop[1] <= box[1] and crop[2] >= box[2] and crop[3] >= box[3]
    right = crop_box((350, 200, 400, 300), (400, 300))
    assert right == (300, 175, 400, 300)
    # the whole square reaches past the frame; the mask is made on it
    assert square_crop_box(box) == (25 - 60, 40 - 60, 25 + 60, 40 + 60)
    assert square_crop_box((350, 200, 400, 300)) == (300, 175, 450, 325)


def test_cut_square_is_black_outside_the_frame():
    frame = np.full((100, 120, 3), 7, np.uint8)
    frame[0, 0] = (1, 2, 3)
    out = cut_square(frame, (-40, -10, 60, 90))
    assert out.shape == (100, 100, 3)
    assert not out[:, :40].any() and not out[:10].any()  # 40 columns left of the frame, 10 rows above
    assert tuple(out[10, 40]) == (1, 2, 3)  # frame pixel (0, 0)
    assert (out[10:, 40:] == frame[:90, :60]).all()
    inside = cut_square(frame, (10, 20, 30, 40))
    assert (inside == frame[20:40, 10:30]).all()


def test_nearest_good_fills_from_the_nearest_face():
    assert nearest_good([None, "a", None, None, "b", None]) == ["a", "a", "a", "b", "b", "b"]
    assert nearest_good(["a", None, "b"]) == ["a", "a", "b"]  # tie -> earlier frame
    assert nearest_good([None, None, (1, 2, 3, 4)]) == [(1, 2, 3, 4)] * 3
    assert nearest_good(["x"]) == ["x"]


def test_nearest_good_without_any_face_names_frames():
    with pytest.raises(NoFaceError, match=r"any of the 7 frames \(frames 0, 1, 2, 3, 4, \.\.\.\)"):
        nearest_good([None] * 7)
    with pytest.raises(NoFaceError):
        nearest_good([])


def test_box_on_real_landmarks(landmarker, astronaut):
    lm = landmarker.landmarks68(astronaut)
    box = face_box(lm, 0, 10, (512, 512))
    x0, y0, x1, y1 = box
    # the box spans the face: cheeks to chin + margin, top above the eyes
    assert x0 == int(lm[:, 0].min()) and x1 == int(lm[:, 0].max())
    assert y1 == int(lm[:, 1].max()) + 10
    assert y0 < lm[36:48, 1].min()
    # mouth inside the lower half of the box (what MuseTalk regenerates)
    line = mask_line_y(box)
    assert line < lm[48:68, 1].min()
    lo, hi = bbox_shift_range([lm])
    assert lo < 0 < hi
    crop = crop_box(box, (512, 512))
    assert crop[2] - crop[0] == crop[3] - crop[1]
