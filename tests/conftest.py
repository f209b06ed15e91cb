"""Shared fixtures: tiny models in the real on-disk formats, real media, a prepared avatar."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
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


@pytest.fixture(scope="session")
def frame_cost_s(models, prepared_avatar) -> float:
    """What one generated frame of the prepared avatar costs this device now (seconds), as the generation
    service measures it (steady full batches). Tests size latency budgets and time bounds from it
    (helpers.budget_for) instead of assuming how fast this machine is."""
    from musetalk.live.service import GenerationService, ServiceSettings

    service = GenerationService(models, ServiceSettings(admission=False))
    try:
        return service.calibrate(service.add_avatar(prepared_avatar), repeats=2)
    finally:
        service.close()


@pytest.fixture(scope="session")
def finish_later():
    """`finish_later(what, fn)`: run `fn` on a thread while the next tests go on (a module's slow clean-up,
    such as a panel's Ctrl-C), and fail the session's end if it raised. Nothing is left unchecked."""
    pool = ThreadPoolExecutor(2, thread_name_prefix="finish-later")
    jobs: list[tuple[str, Future]] = []

    def submit(what: str, fn: Callable[[], None]) -> None:
        jobs.append((what, pool.submit(fn)))

    yield submit
    pool.shutdown(wait=True)
    failed = [f"{what}: {job.exception()!r}" for what, job in jobs if job.exception() is not None]
    assert not failed, "checks finished after their tests failed:\n" + "\n".join(failed)


def _file(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


def _is_realtime(item: pytest.Item) -> bool:
    return item.get_closest_marker("realtime") is not None


@pytest.hookimpl(wrapper=True)  # around every other implementation: the groups exist before xdist reads them
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> Generator[None]:
    """Under test.sh's `-n 2 --dist loadgroup --no-loadscope-reorder`, each test file is one unit of work (its
    module fixtures start once, on one worker), and the `realtime` tests (frame rates and latencies at a viewer)
    are one more unit, run one after another."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for item in items:
            item.add_marker(pytest.mark.xdist_group("realtime" if _is_realtime(item) else _file(item)))
    return (yield)


@pytest.hookimpl(tryfirst=True)  # after pytest's own ordering by fixtures, before xdist sends the order
def pytest_collection_finish(session: pytest.Session) -> None:
    """The order the two workers take the units in: the files holding slow tests first (the long units, so the
    two workers end close together), then the fast-only files, then the real-time unit, which starts once every
    other unit has been handed out: it runs (nearly) alone on the machine, as in a serial run."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    long_files = {_file(item) for item in session.items if item.get_closest_marker("slow") is not None}

    def lane(item: pytest.Item) -> int:
        return 2 if _is_realtime(item) else 0 if _file(item) in long_files else 1

    session.items.sort(key=lane)  # stable: each lane keeps pytest's order
