"""Avatar preparation and the store, on real face videos made from the astronaut image."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import media
import numpy as np
import pytest

from musetalk.avatar.prepare import PreparationCancelled, boxes_for, prepare_avatar, track_faces
from musetalk.avatar.store import FORMAT_VERSION, AvatarStore, ping_pong, validate_name
from musetalk.config import PrepareSettings, load_realtime_config, save_realtime_config
from musetalk.errors import AvatarError, ConfigError, MediaError, NoFaceError
from musetalk.face.box import mask_line_y
from musetalk.face.mask import blur_kernel_size
from musetalk.media import read_video


def test_prepared_avatar_contents(prepared_avatar, avatar_store, face_video):
    av = prepared_avatar
    m = av.manifest
    assert m.frame_count == 50 and len(av.frames) == 50
    assert m.fps == 25 and m.frame_size == (512, 512)
    assert m.format_version == FORMAT_VERSION and m.model_version == "v15"
    assert m.source_video == str(face_video)
    assert m.preparation["bbox_shift"] == 0 and m.preparation["extra_margin"] == 10
    assert m.preparation["mask_mode_used"] == "jaw"
    lo, hi = m.preparation["bbox_shift_range"]
    assert lo < 0 < hi
    assert m.preparation["frames_without_face"] == []
    assert m.disk_bytes > 0 and m.created.endswith("+00:00")
    assert tuple(av.latents.shape) == (50, 8, 32, 32)
    assert av.boxes.shape == (50, 4) and av.crop_boxes.shape == (50, 4)
    for box, cb, mask in zip(av.boxes, av.crop_boxes, av.masks):
        x0, y0, x1, y1 = box
        assert cb[0] <= x0 < x1 <= cb[2] and cb[1] <= y0 < y1 <= cb[3]
        assert mask.shape == (cb[3] - cb[1], cb[2] - cb[0])
        # nothing is blended above the face box centre line (the inpainting line)
        line = mask_line_y(box) - cb[1]
        reach = blur_kernel_size(mask.shape[1]) // 2 + 1  # the Gaussian blur spreads the edge this far
        assert mask[: max(line - reach, 0)].max() == 0
        assert mask[line + reach :].max() == 255
    # ping-pong loop: forward then backward, seamless
    assert list(av.cycle[:3]) == [0, 1, 2] and list(av.cycle[-3:]) == [2, 1, 0]
    assert av.frame_index(100) == 0 and av.frame_index(50) == 49
    assert (avatar_store.root / "astro" / "thumbnail.jpg").is_file()
    assert avatar_store.names() == ["astro"] or "astro" in avatar_store.names()


def test_box_covers_the_detected_face(prepared_avatar, models):
    for i in (0, 25, 49):
        frame = prepared_avatar.frames[i]
        det = models.landmarker.detect(frame)[0].box
        x0, y0, x1, y1 = prepared_avatar.boxes[i]
        ix = min(x1, det[2]) - max(x0, det[0])
        iy = min(y1, det[3]) - max(y0, det[1])
        inter = max(ix, 0) * max(iy, 0)
        union = (x1 - x0) * (y1 - y0) + (det[2] - det[0]) * (det[3] - det[1]) - inter
        assert inter / union > 0.5


def test_bbox_shift_moves_the_mask_line(models, face_video):
    frames, _ = read_video(face_video)
    track = track_faces(models.landmarker, frames[:5])
    size = (frames[0].shape[1], frames[0].shape[0])
    base = boxes_for(track, PrepareSettings(bbox_shift=0, extra_margin=0), size)
    for shift in (-6, -3, 4, 7):
        moved = boxes_for(track, PrepareSettings(bbox_shift=shift, extra_margin=0), size)
        for a, b in zip(base, moved):
            assert (b[1] + b[3]) - (a[1] + a[3]) == 2 * shift  # centre line moves by exactly `shift`
            assert b[3] == a[3] and b[0] == a[0] and b[2] == a[2]


def test_ping_pong():
    assert list(ping_pong(3)) == [0, 1, 2, 2, 1, 0]


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 65, "spaces here", "..", "name.with.dots"])
def test_bad_names_are_refused(name, models, avatar_store, face_video):
    with pytest.raises(AvatarError, match="Invalid avatar name"):
        validate_name(name)
    with pytest.raises(AvatarError):
        prepare_avatar(models, avatar_store, face_video, name)
    assert not any(p.name.startswith(".tmp") for p in avatar_store.root.iterdir())


def test_load_missing_avatar_names_the_known_ones(prepared_avatar, avatar_store):
    with pytest.raises(AvatarError, match="astro"):
        avatar_store.load("nobody")


def test_manifest_version_is_checked(prepared_avatar, avatar_store, tmp_path):
    import shutil

    store = AvatarStore(tmp_path / "avatars")
    shutil.copytree(avatar_store.root / prepared_avatar.name, store.root / "old")
    path = store.root / "old" / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(AvatarError, match="prepare it again"):
        store.load("old")
    (store.root / "old" / "latents.npy").unlink()
    data["format_version"] = FORMAT_VERSION
    path.write_text(json.dumps(data))
    with pytest.raises(AvatarError, match="damaged"):
        store.load("old")


def test_rename_and_delete(prepared_avatar, avatar_store, tmp_path):
    import shutil

    store = AvatarStore(tmp_path / "avatars")
    shutil.copytree(avatar_store.root / prepared_avatar.name, store.root / "a1")
    store.rename("a1", "a2")
    assert store.names() == ["a2"] and store.manifest("a2").name == "a2"
    assert store.load("a2").manifest.frame_count == 50
    with pytest.raises(AvatarError):
        store.rename("a2", "../evil")
    store.delete("a2")
    assert store.names() == [] and list(store.root.iterdir()) == []
    with pytest.raises(AvatarError):
        store.delete("a2")


def test_cancel_leaves_nothing(models, tmp_path, face_video):
    store = AvatarStore(tmp_path / "avatars")
    cancel = threading.Event()
    seen = []

    def progress(fraction, message):
        seen.append(fraction)
        if fraction > 0.5:
            cancel.set()

    with pytest.raises(PreparationCancelled):
        prepare_avatar(models, store, face_video, "cancelled", progress=progress, cancel=cancel)
    assert store.names() == [] and list(store.root.iterdir()) == []
    assert seen == sorted(seen)


KILL_SCRIPT = r"""
import sys, time
sys.path.insert(0, sys.argv[4])
from pathlib import Path
from musetalk.avatar.prepare import prepare_avatar
from musetalk.avatar.store import AvatarStore
from musetalk.config import ModelPaths, RuntimeSettings
from musetalk.models import load_models
models = load_models(ModelPaths(Path(sys.argv[1])), RuntimeSettings(device="cpu"))
def slow(fraction, message):
    if message.startswith("Writing"):
        print("WRITING", flush=True)
        time.sleep(0.5)
prepare_avatar(models, AvatarStore(sys.argv[2]), sys.argv[3], "victim", progress=slow)
"""


@pytest.mark.slow
def test_kill_mid_write_leaves_old_avatar_intact(tiny_models_dir, tmp_path, face_video, prepared_avatar, avatar_store):
    """SIGKILL while re-preparing: the previous avatar stays loadable, no half avatar appears."""
    import shutil

    from helpers import REPO

    store_dir = tmp_path / "avatars"
    store = AvatarStore(store_dir)
    shutil.copytree(avatar_store.root / prepared_avatar.name, store_dir / "victim")
    before = (store_dir / "victim" / "manifest.json").read_text()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(tiny_models_dir), str(store_dir), str(face_video), str(REPO)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        line = ""
        while "WRITING" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "WRITING" in line, "the preparation never reached the write step"
        time.sleep(1.2)  # a few frames into the write
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = [p.name for p in store_dir.iterdir() if p.name != "victim"]
    assert leftovers and all(n.startswith(".tmp-victim-") for n in leftovers)  # the killed half avatar is hidden
    assert store.names() == ["victim"]
    assert (store_dir / "victim" / "manifest.json").read_text() == before
    assert AvatarStore(store_dir).load("victim").manifest.frame_count == 50
    assert [p.name for p in store_dir.iterdir()] == ["victim"]  # reopening the store cleaned up


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("image", ["chelsea", "coffee"])
def test_video_without_a_face_is_refused(models, tmp_path, image):
    video = media.still_video(tmp_path / f"{image}.mp4", image, seconds=0.4)
    store = AvatarStore(tmp_path / "avatars")
    with pytest.raises(NoFaceError, match="No face"):
        prepare_avatar(models, store, video, "noface")
    assert list(store.root.iterdir()) == []


def test_several_faces_uses_the_largest(models, tmp_path):
    video = media.two_faces_video(tmp_path / "two.mp4", seconds=0.4)
    store = AvatarStore(tmp_path / "avatars")
    m = prepare_avatar(models, store, video, "two")
    assert any("largest" in n for n in m.notes)
    box = store.load("two").boxes[0]
    assert box[2] < 430  # the large face is on the left half of the 800 px frame


@pytest.mark.parametrize(
    "maker, message",
    [
        (lambda p: media.corrupt_file(p / "bad.mp4"), "corrupt"),
        (lambda p: media.empty_file(p / "empty.mp4"), "empty"),
        (lambda p: media.audio_only_file(p / "speech.m4a"), "no video stream"),
        (lambda p: p / "missing.mp4", "does not exist"),
    ],
)
def test_unreadable_videos(models, tmp_path, maker, message):
    store = AvatarStore(tmp_path / "avatars")
    with pytest.raises(MediaError, match=message):
        prepare_avatar(models, store, maker(tmp_path), "bad")
    assert list(store.root.iterdir()) == []


def test_4k_video_is_scaled(models, tmp_path):
    video = media.astronaut_video(tmp_path / "4k.mp4", seconds=0.4, size=(3840, 2160))
    m = prepare_avatar(models, AvatarStore(tmp_path / "avatars"), video, "uhd")
    assert m.frame_size == (1920, 1080) and m.preparation["source"]["size"] == [3840, 2160]
    assert m.preparation["max_side"] == 1920


def test_native_size_is_kept_and_odd_sizes_lose_a_row_not_a_resample(tmp_path):
    """Up to max_side the frames are the decoded pixels; an odd size is cropped to even."""
    import imageio_ffmpeg

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (361, 641, 3), dtype=np.uint8)
    src = tmp_path / "noise.png"
    import cv2

    cv2.imwrite(str(src), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    video = tmp_path / "noise.mkv"  # lossless RGB, so decoded pixels equal the image
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-nostdin",
        "-v",
        "error",
        "-loop",
        "1",
        "-i",
        str(src),
        "-t",
        "0.2",
        "-r",
        "25",
        "-c:v",
        "ffv1",
        "-pix_fmt",
        "bgr0",
        str(video),
    ]
    subprocess.run(cmd, check=True)
    frames, info = read_video(video)
    assert info.source_size == (641, 361) and info.size == (640, 360)
    assert np.array_equal(frames[0], image[:360, :640])
    small, info = read_video(video, max_side=320)
    assert info.size == (320, 180)


def test_vertical_video(models, tmp_path):
    video = media.astronaut_video(tmp_path / "vertical.mp4", seconds=0.4, vertical=True)
    m = prepare_avatar(models, AvatarStore(tmp_path / "avatars"), video, "portrait")
    assert m.frame_size == (720, 1280)


def test_variable_frame_rate_is_resampled_to_25fps(models, tmp_path):
    video = media.astronaut_video(tmp_path / "vfr.mp4", seconds=1.6, fps=25, vfr=True)
    frames, info = read_video(video)
    assert abs(len(frames) - round(info.duration * 25)) <= 1
    m = prepare_avatar(models, AvatarStore(tmp_path / "avatars"), video, "vfr")
    assert m.fps == 25 and m.frame_count == len(frames)


def test_very_short_video(models, tmp_path):
    video = media.astronaut_video(tmp_path / "short.mp4", seconds=0.2)
    m = prepare_avatar(models, AvatarStore(tmp_path / "avatars"), video, "short")
    assert m.frame_count == 5


def test_bbox_shift_beyond_the_chin_is_a_clear_error(models, tmp_path, face_video):
    with pytest.raises(ConfigError, match="bbox_shift"):
        prepare_avatar(models, AvatarStore(tmp_path / "avatars"), face_video, "x", PrepareSettings(bbox_shift=150))


def test_realtime_yaml_round_trip(tmp_path):
    cfg = tmp_path / "realtime.yaml"
    cfg.write_text(
        'avatar_1:\n  preparation: True\n  bbox_shift: 5\n  video_path: "data/video/person1.mp4"\n'
        '  audio_clips:\n    sample: "data/audio/sample1.wav"\n'
        "avatar_2:\n  preparation: False\n  bbox_shift: 0\n  video_path: x.mp4\n"
    )
    entries = load_realtime_config(cfg)
    assert [e.name for e in entries] == ["avatar_1", "avatar_2"]
    assert entries[0].preparation is True and entries[0].bbox_shift == 5
    assert str(entries[0].audio_clips["sample"]) == "data/audio/sample1.wav"
    save_realtime_config(entries, tmp_path / "copy.yaml")
    assert load_realtime_config(tmp_path / "copy.yaml") == entries
    cfg.write_text("avatar_1:\n  preparation: True\n")
    with pytest.raises(ConfigError, match="video_path"):
        load_realtime_config(cfg)
    cfg.write_text("avatar_1: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_realtime_config(cfg)


def test_prepare_with_dwpose_landmarks(models, tmp_path, face_video):
    """With DWPose weights present, `auto` uses them; the manifest says so; boxes follow its points."""
    from dataclasses import replace

    from tiny_dwpose import write_symmetric_face_dwpose

    from musetalk.config import ModelPaths
    from musetalk.face.box import face_box
    from musetalk.face.dwpose import DWPose, dwpose_path

    root = tmp_path / "models"
    write_symmetric_face_dwpose(dwpose_path(root))
    with_dwpose = replace(models, paths=ModelPaths(root))
    frames, _ = read_video(face_video)
    want = DWPose.from_file(dwpose_path(root)).landmarks68(frames[0])  # constant network: same for every frame
    m = prepare_avatar(
        with_dwpose, AvatarStore(tmp_path / "avatars"), face_video, "dw", PrepareSettings(max_seconds=0.4)
    )
    assert m.preparation["landmark_source"] == "dwpose" and m.format_version == FORMAT_VERSION
    av = AvatarStore(tmp_path / "avatars").load("dw")
    box = face_box(want, 0, 10, (512, 512))
    assert all(tuple(b) == box for b in av.boxes)
    from musetalk.avatar.preview import preview_video

    shown = preview_video(with_dwpose, face_video, PrepareSettings(max_seconds=0.4), count=2)
    assert shown.landmark_source == "dwpose" and shown.notes[0].startswith("Landmarks: DWPose")
    assert shown.frames[0].box == box
    off = prepare_avatar(
        with_dwpose,
        AvatarStore(tmp_path / "avatars"),
        face_video,
        "mesh",
        PrepareSettings(max_seconds=0.4, landmarks="offline"),
        max_side=384,
    )
    assert off.preparation["landmark_source"] == "offline"
    assert off.frame_size == (384, 384) and off.preparation["max_side"] == 384  # the keyword the panel passes


def test_old_format_avatar_loads_renders_and_reprepares_from_the_cli(
    prepared_avatar, avatar_store, tiny_models_dir, models, tmp_path, monkeypatch
):
    import shutil

    from musetalk.__main__ import main
    from musetalk.render import render

    store = AvatarStore(tmp_path / "avatars")
    shutil.copytree(avatar_store.root / prepared_avatar.name, store.root / "old")
    path = store.root / "old" / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 1  # written by the earlier rules: no landmark source, 1280 px cap
    data["preparation"].pop("landmark_source")
    data["preparation"]["max_side"] = 1280
    data["preparation"].pop("landmarks")
    path.write_text(json.dumps(data))
    old = store.load("old")
    assert old.manifest.format_version == 1
    clip = media.speech_wav(tmp_path / "short.wav", "Hi.")
    result = render(models, old, clip, tmp_path / "old.mp4")
    assert result.path.is_file() and result.frames > 0

    monkeypatch.setenv("MUSETALK_MODELS_DIR", str(tiny_models_dir))
    monkeypatch.setenv("MUSETALK_AVATARS_DIR", str(store.root))
    monkeypatch.setenv("MUSETALK_DEVICE", "cpu")
    assert main(["reprepare", "old", "--landmarks", "offline"]) == 0
    new = store.manifest("old")
    assert new.format_version == FORMAT_VERSION == 2
    assert new.preparation["landmark_source"] == "offline" and new.preparation["max_side"] == 1920
    assert new.preparation["bbox_shift"] == data["preparation"]["bbox_shift"]
    assert store.load("old").manifest.frame_count == data["frame_count"]
    assert main(["reprepare", "nobody"]) == 2
