"""Shared fixtures: tiny models in the real on-disk formats, real media, a prepared avatar."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

import media  # noqa: E402

from musetalk.testing import write_tiny_models  # noqa: E402

REPO = TESTS.parent


def real_models_dir() -> Path:
    return Path(os.environ.get("MUSETALK_MODELS_DIR", REPO / "models"))


@pytest.fixture(scope="session")
def landmarks_dir() -> Path:
    path = real_models_dir() / "face-landmarks"
    if not (path / "face_landmark.tflite").is_file():
        pytest.fail(f"face models missing in {path}: run `python scripts/fetch_face_models.py` (test.sh does)")
    return path


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory, landmarks_dir) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_tiny_models(root, landmarks_dir)
    return root


@pytest.fixture(scope="session")
def models(tiny_models_dir):
    from musetalk.config import ModelPaths, RuntimeSettings
    from musetalk.models import load_models

    return load_models(ModelPaths(tiny_models_dir), RuntimeSettings(device="cpu"))


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def face_video(media_dir) -> Path:
    return media.astronaut_video(media_dir / "astronaut.mp4", seconds=2.0)


@pytest.fixture(scope="session")
def speech(media_dir) -> Path:
    return media.speech_wav(media_dir / "speech.wav", "Hello. This is a test of lip sync.")


@pytest.fixture(scope="session")
def avatar_store(tmp_path_factory):
    from musetalk.avatar.store import AvatarStore

    return AvatarStore(tmp_path_factory.mktemp("avatars"))


@pytest.fixture(scope="session")
def prepared_avatar(models, avatar_store, face_video):
    """The astronaut clip prepared once per session (name `astro`)."""
    from musetalk.avatar.prepare import prepare_avatar

    prepare_avatar(models, avatar_store, face_video, "astro")
    return avatar_store.load("astro")
