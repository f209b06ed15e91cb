"""Offline render and the command line, end to end with tiny models and real media."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import media
import numpy as np
import pytest
from helpers import REPO

from musetalk.errors import MediaError
from musetalk.media import load_audio, probe_duration, read_video
from musetalk.render import render


def _streams(path) -> str:
    import imageio_ffmpeg

    proc = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-i", str(path)], capture_output=True, text=True
    )
    return proc.stderr


@pytest.mark.parametrize(
    "make",
    [
        lambda d: media.speech_wav(d / "r16.wav", "Quick fox."),
        lambda d: media.speech_wav(d / "r48.wav", "Quick fox.", rate=48000, stereo=True),
        lambda d: media.audio_only_file(d / "r.mp3", "Quick fox."),
        lambda d: media.silence_wav(d / "silent.wav", 0.7),
    ],
    ids=["wav16k-mono", "wav48k-stereo", "mp3", "silence"],
)
def test_render_duration_matches_audio(models, prepared_avatar, tmp_path, make):
    audio_path = make(tmp_path)
    out = tmp_path / "out.mp4"
    result = render(models, prepared_avatar, audio_path, out)
    audio_seconds = len(load_audio(audio_path)) / 16000
    frames, info = read_video(out)
    assert len(frames) == result.frames
    assert abs(len(frames) / 25 - audio_seconds) <= 1 / 25
    assert abs(probe_duration(out) - audio_seconds) <= 1 / 25 + 0.03  # AAC priming
    header = _streams(out)
    assert "Video: h264" in header and "Audio: aac" in header and "25 fps" in header
    assert frames[0].shape == (512, 512, 3)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial file left


def test_render_changes_only_the_mouth_region(models, prepared_avatar, speech, tmp_path):
    from musetalk.audio import AudioFeatureEncoder
    from musetalk.generate import LipSyncGenerator

    enc = AudioFeatureEncoder(models.whisper, models.feature_extractor, models.device, models.dtype)
    feats = enc.frame_features(load_audio(speech))[:12]
    gen = LipSyncGenerator(models, prepared_avatar, batch_size=4)
    try:
        frames = list(gen.generate(feats, start_position=3))
    finally:
        gen.close()
    assert len(frames) == 12
    for k, frame in enumerate(frames):
        i = prepared_avatar.frame_index(3 + k)
        original = prepared_avatar.frames[i]
        cx0, cy0, cx1, cy1 = prepared_avatar.crop_boxes[i]
        outside = np.ones(original.shape[:2], bool)
        outside[cy0:cy1, cx0:cx1] = False
        assert np.array_equal(frame[outside], original[outside])
        assert not np.array_equal(frame[cy0:cy1, cx0:cx1], original[cy0:cy1, cx0:cx1])


def test_render_refuses_bad_audio(models, prepared_avatar, tmp_path, face_video):
    with pytest.raises(MediaError, match="no audio stream"):
        render(models, prepared_avatar, face_video, tmp_path / "x.mp4")
    with pytest.raises(MediaError, match="corrupt"):
        render(models, prepared_avatar, media.corrupt_file(tmp_path / "bad.wav"), tmp_path / "x.mp4")
    with pytest.raises(MediaError, match="empty"):
        render(models, prepared_avatar, media.empty_file(tmp_path / "empty.wav"), tmp_path / "x.mp4")
    assert not (tmp_path / "x.mp4").exists()


def _cli(args, env_extra, check=True):
    env = {**os.environ, **env_extra}
    proc = subprocess.run(
        [sys.executable, "-m", "musetalk", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_cli_prepare_list_render_delete(tiny_models_dir, tmp_path, media_dir, speech):
    video = media.astronaut_video(media_dir / "cli.mp4", seconds=0.6)
    env = {
        "MUSETALK_MODELS_DIR": str(tiny_models_dir),
        "MUSETALK_AVATARS_DIR": str(tmp_path / "av"),
        "MUSETALK_DEVICE": "cpu",
    }
    out = _cli(["prepare", str(video), "--name", "cli_one", "--bbox-shift", "2", "--extra-margin", "6"], env)
    assert "cli_one: 15 frames" in out.stdout and "bbox_shift range" in out.stdout
    listing = json.loads(_cli(["list", "--json"], env).stdout)
    assert [a["name"] for a in listing] == ["cli_one"]
    assert listing[0]["preparation"]["bbox_shift"] == 2 and listing[0]["preparation"]["extra_margin"] == 6
    assert "cli_one" in _cli(["list"], env).stdout
    mp4 = tmp_path / "cli.mp4"
    out = _cli(["render", "cli_one", str(speech), "-o", str(mp4)], env)
    assert mp4.is_file() and "wrote" in out.stdout
    _cli(["delete", "cli_one"], env)
    assert json.loads(_cli(["list", "--json"], env).stdout) == []


@pytest.mark.slow  # five runs of the CLI
def test_cli_errors_are_messages_not_tracebacks(tiny_models_dir, tmp_path, face_video, speech):
    from concurrent.futures import ThreadPoolExecutor

    env = {"MUSETALK_MODELS_DIR": str(tiny_models_dir), "MUSETALK_AVATARS_DIR": str(tmp_path / "av")}
    no_models = {**env, "MUSETALK_MODELS_DIR": str(tmp_path / "no-models")}
    cases = [
        (["prepare", str(face_video), "--name", "../x"], env, ["Invalid avatar name"]),
        (["render", "ghost", str(speech), "-o", str(tmp_path / "o.mp4")], env, ["No avatar named 'ghost'"]),
        (["delete", "ghost"], env, ["No avatar named"]),
        (["prepare", str(tmp_path / "nope.mp4"), "--name", "x"], env, ["does not exist"]),
        (["prepare", str(face_video), "--name", "x"], no_models, ["bash download_weights.sh", "unet.pth"]),
    ]
    with ThreadPoolExecutor(2) as pool:  # independent runs, two at a time (each is mostly interpreter start-up)
        runs = list(pool.map(lambda case: _cli(case[0], case[1], check=False), cases))
    for (args, _, messages), proc in zip(cases, runs):
        assert proc.returncode == 2, (args, proc.stderr)
        assert all(m in proc.stderr for m in messages) and "Traceback" not in proc.stderr, (args, proc.stderr)


@pytest.mark.slow  # the CLI prepares an avatar
def test_cli_from_config(tiny_models_dir, tmp_path, media_dir):
    video = media.astronaut_video(media_dir / "cfg.mp4", seconds=0.4)
    cfg = tmp_path / "realtime.yaml"
    cfg.write_text(f"avatar_1:\n  preparation: True\n  bbox_shift: 3\n  video_path: {video}\n  audio_clips: {{}}\n")
    env = {"MUSETALK_MODELS_DIR": str(tiny_models_dir), "MUSETALK_AVATARS_DIR": str(tmp_path / "av")}
    assert "avatar_1: ready" in _cli(["from-config", "--config", str(cfg)], env).stdout
    listing = json.loads(_cli(["list", "--json"], env).stdout)
    assert listing[0]["name"] == "avatar_1" and listing[0]["preparation"]["bbox_shift"] == 3
