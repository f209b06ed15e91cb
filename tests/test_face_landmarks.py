"""Offline face detection and landmarks with the real MediaPipe models on real images."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import cv2
import media
import numpy as np
import pytest

from musetalk.errors import MediaError, MissingWeightsError
from musetalk.face import FACE_OVAL, MESH_TO_IBUG68, FaceDetection, FaceLandmarker, mesh_to_68

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("MUSETALK_MODELS_DIR", REPO / "models"))

# Mesh points on skimage.data.astronaut() (512x512), measured with the same two models.
ASTRONAUT_MESH = {
    1: (223, 131),  # nose tip
    168: (226, 101),  # nose bridge
    6: (225, 106),
    152: (221, 176),  # chin
    61: (202, 139),  # mouth corners
    291: (246, 141),
    234: (179, 111),  # cheeks
    454: (271, 117),
}


@pytest.fixture(scope="module")
def landmarker() -> FaceLandmarker:
    if not (MODELS / "face-landmarks" / "face_landmark.tflite").is_file():
        pytest.skip(f"face models not fetched into {MODELS}/face-landmarks: run python scripts/fetch_face_models.py")
    return FaceLandmarker.from_pretrained(MODELS / "face-landmarks")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


def read_frames(path: Path, limit: int | None = None) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while limit is None or len(frames) < limit:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    assert frames, f"could not decode {path}"
    return frames


# ---------------------------------------------------------------- the index tables


def test_tables_are_valid_mesh_indices():
    assert len(MESH_TO_IBUG68) == 68 and len(set(MESH_TO_IBUG68)) == 68
    assert all(0 <= i < 468 for i in MESH_TO_IBUG68)
    assert len(FACE_OVAL) == 36 and len(set(FACE_OVAL)) == 36
    assert MESH_TO_IBUG68[8] == 152  # chin
    assert MESH_TO_IBUG68[30] in (1, 4)  # nose tip


def test_jaw_follows_the_face_oval_in_order():
    jaw = MESH_TO_IBUG68[:17]
    assert set(jaw) <= set(FACE_OVAL)
    pos = [FACE_OVAL.index(i) for i in jaw]
    # the oval runs forehead -> image right -> chin -> image left; the jaw runs image left
    # (subject's right ear) -> chin -> image right, i.e. backwards along the oval
    assert all(a > b for a, b in zip(pos, pos[1:]))


# ---------------------------------------------------------------- the astronaut


def test_detects_exactly_one_face_in_the_astronaut(landmarker, astronaut):
    faces = landmarker.detect(astronaut)
    assert len(faces) == 1
    face = faces[0]
    assert 0.85 < face.score < 0.99
    x0, y0, x1, y1 = face.box
    assert 170 < x0 < 190 and 75 < y0 < 90 and 262 < x1 < 282 and 165 < y1 < 185
    assert face.area == pytest.approx((x1 - x0) * (y1 - y0))


def test_mesh_matches_reference_points(landmarker, astronaut):
    mesh = landmarker.mesh(astronaut)
    assert mesh.shape == (468, 2) and mesh.dtype == np.float32
    for idx, (x, y) in ASTRONAUT_MESH.items():
        err = float(np.hypot(mesh[idx, 0] - x, mesh[idx, 1] - y))
        assert err < 3.0, f"mesh point {idx} at {mesh[idx]} is {err:.1f} px from {(x, y)}"


def test_68_points_are_in_ibug_order(landmarker, astronaut):
    lm = landmarker.landmarks68(astronaut)
    assert lm.shape == (68, 2) and lm.dtype == np.float32
    x, y = lm[:, 0], lm[:, 1]
    # jaw: ear to chin to ear, left to right in the image, chin the lowest point of all
    assert np.all(np.diff(x[:17]) > 0)
    assert int(np.argmax(y)) == 8
    assert np.all(np.diff(y[:9]) > 0) and np.all(np.diff(y[8:17]) < 0)
    # 27 -> 30 down the nose bridge, 30 at the nose tip
    assert np.all(np.diff(y[27:31]) > 0)
    assert np.hypot(*(lm[30] - (223, 131))) < 6
    # nose bottom left to right, below the tip
    assert np.all(np.diff(x[31:36]) > 0) and np.all(y[31:36] > y[30] - 3)
    # eyes: corners in order across the face, brows above them
    assert x[36] < x[39] < x[42] < x[45]
    assert y[17:22].max() < y[36:42].min() and y[22:27].max() < y[42:48].min()
    assert np.all(np.diff(x[17:27]) > 0)
    # mouth: corners outside the inner corners, upper lip above lower lip, below the nose
    assert x[48] < x[60] < x[64] < x[54]
    assert y[51] < y[62] < y[66] < y[57]
    assert y[48:68].min() > y[33] - 1
    # the box-relevant points sit where MuseTalk expects them
    assert y[28] < y[29] < y[30] < y[33]
    assert x[:17].min() == x.min() and x[:17].max() == x.max()


def test_landmarks68_picks_mesh_points(landmarker, astronaut):
    mesh = landmarker.mesh(astronaut)
    np.testing.assert_array_equal(mesh_to_68(mesh), landmarker.landmarks68(astronaut))


def test_hand_made_detection_without_keypoints(landmarker, astronaut):
    auto = landmarker.mesh(astronaut)
    manual = landmarker.mesh(astronaut, FaceDetection((178.0, 81.0, 272.0, 175.0), 1.0))
    # an axis-aligned crop instead of an eye-levelled one: the same face within a few pixels
    assert np.median(np.hypot(*(auto - manual).T)) < 3.0


# ---------------------------------------------------------------- no faces, several faces


@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_no_face_in_cat_and_coffee(landmarker, name):
    import skimage.data

    img = getattr(skimage.data, name)()
    assert landmarker.detect(img) == []
    assert landmarker.landmarks68(img) is None
    assert landmarker.mesh(img) is None


def test_largest_of_two_faces_first(landmarker):
    frame = media.two_faces_frame()
    faces = landmarker.detect(frame)
    assert len(faces) == 2
    big, small = faces
    assert big.area > 2 * small.area
    assert big.box[2] < 440 < small.box[0]  # big one on the left, as drawn
    lm = landmarker.landmarks68(frame)  # the largest face by default
    assert lm[:, 0].max() < 440


def test_two_faces_video_decodes_with_both_faces(landmarker, tmp_path):
    frames = read_frames(media.two_faces_video(tmp_path / "two.mp4", seconds=0.2))
    assert len(landmarker.detect(frames[0])) == 2


# ---------------------------------------------------------------- frame shapes


def test_face_in_every_frame_of_the_test_video(landmarker, tmp_path):
    frames = read_frames(media.astronaut_video(tmp_path / "astro.mp4", seconds=1.0))
    assert len(frames) == 25
    assert all(landmarker.landmarks68(f) is not None for f in frames)


def test_4k_frame(landmarker, tmp_path):
    frames = read_frames(media.astronaut_video(tmp_path / "4k.mp4", seconds=0.12, size=(3840, 2160)), limit=1)
    big = frames[0]
    assert big.shape == (2160, 3840, 3)
    faces = landmarker.detect(big)
    assert len(faces) == 1
    lm_big = landmarker.landmarks68(big)
    small = cv2.resize(big, (960, 540), interpolation=cv2.INTER_AREA)
    lm_small = landmarker.landmarks68(small)
    face_w = float(lm_big[:, 0].max() - lm_big[:, 0].min())
    # the same face found at full resolution, to ~1 % of its width
    assert np.median(np.hypot(*(lm_big / 4 - lm_small).T)) * 4 < 0.01 * face_w + 4


def test_vertical_frame(landmarker, tmp_path):
    frames = read_frames(media.astronaut_video(tmp_path / "v.mp4", seconds=0.2, vertical=True), limit=3)
    assert frames[0].shape == (1280, 720, 3)
    for frame in frames:
        faces = landmarker.detect(frame)
        assert len(faces) == 1
        lm = landmarker.landmarks68(frame, faces[0])
        x0, y0, x1, y1 = faces[0].box
        assert x0 - 20 < lm[30, 0] < x1 + 20 and y0 < lm[30, 1] < y1


def test_vfr_video_is_readable_with_faces(landmarker, tmp_path):
    frames = read_frames(media.astronaut_video(tmp_path / "vfr.mp4", seconds=0.5, vfr=True))
    assert len(frames) >= 10
    assert landmarker.landmarks68(frames[-1]) is not None


def test_bad_frames_raise_media_error(landmarker, astronaut):
    with pytest.raises(MediaError, match="uint8 RGB"):
        landmarker.detect(astronaut.astype(np.float32))
    with pytest.raises(MediaError, match="uint8 RGB"):
        landmarker.landmarks68(astronaut[:, :, 0])
    with pytest.raises(MediaError, match="too small"):
        landmarker.detect(astronaut[:4, :4])


# ---------------------------------------------------------------- weights


def test_missing_models_name_both_files_and_the_fetch_command(tmp_path):
    with pytest.raises(MissingWeightsError) as info:
        FaceLandmarker.from_pretrained(tmp_path / "face-landmarks")
    msg = str(info.value)
    assert "face_detection_short_range.tflite" in msg and "face_landmark.tflite" in msg
    assert "python scripts/fetch_face_models.py" in msg


def test_unreadable_model_file_is_reported(tmp_path):
    d = tmp_path / "face-landmarks"
    d.mkdir()
    (d / "face_detection_short_range.tflite").write_bytes(b"not a model" * 10)
    (d / "face_landmark.tflite").write_bytes(b"not a model" * 10)
    with pytest.raises(MissingWeightsError, match="cannot be loaded"):
        FaceLandmarker.from_pretrained(d)


def test_models_root_is_accepted(landmarker):
    assert isinstance(FaceLandmarker.from_pretrained(MODELS), FaceLandmarker)


def _fetch_module():
    spec = importlib.util.spec_from_file_location("fetch_face_models", REPO / "scripts" / "fetch_face_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fetch_script_skips_present_files(landmarker, capsys):
    assert _fetch_module().main(["--models-dir", str(MODELS)]) == 0
    assert "already present" in capsys.readouterr().out


def test_fetch_script_fails_clearly_without_a_registry(tmp_path):
    env = dict(os.environ)
    env.update(
        PIP_CONFIG_FILE=os.devnull,
        PIP_INDEX_URL="http://127.0.0.1:9/simple",
        PIP_FIND_LINKS="",
        PIP_EXTRA_INDEX_URL="",
        PIP_RETRIES="0",
        PIP_DEFAULT_TIMEOUT="2",
    )
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fetch_face_models.py"), "--models-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode != 0
    assert "could not download mediapipe" in proc.stderr
    assert not (tmp_path / "face-landmarks" / "face_landmark.tflite").exists()


def test_one_instance_shared_by_threads_gives_the_same_points(landmarker, astronaut):
    from concurrent.futures import ThreadPoolExecutor

    expected = landmarker.landmarks68(astronaut)
    frames = [astronaut, astronaut[:, ::-1].copy()] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(landmarker.landmarks68, frames))
    for frame_index, lm in enumerate(results):
        if frame_index % 2 == 0:
            np.testing.assert_array_equal(lm, expected)
        else:
            assert lm is not None
