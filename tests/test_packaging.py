"""`pip install .`: the wheel holds the library (and its browser page), and asks for the same pins
as requirements*.txt, so a Pipecat developer gets what run.sh installs.

The wheel is built from a copy of the files git would check out (tracked, plus untracked ones
not ignored), so the build leaves no build/ or *.egg-info in the working tree, and weights or
avatars in models/ and avatars/ cannot slip in.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PANEL_ONLY = {"gradio", "gradio-client"}
TEST_ONLY = {"scikit-image"}  # in requirements.txt, imported by the tests only: the `dev` extra


def pin(req: Requirement) -> tuple[str, tuple[str, ...], str, str]:
    """A requirement in a form that compares equal however it is spelled (name case, -/_, order)."""
    marker = re.sub(r'(and )?extra == "\w+"', "", str(req.marker or "")).strip()
    return canonicalize_name(req.name), tuple(sorted(req.extras)), str(req.specifier), marker


def read_requirements(name: str) -> set[tuple]:
    """The pins of one requirements file (comments, blank lines and `-r` includes left out)."""
    lines = (line.split("#", 1)[0].strip() for line in (REPO / name).read_text(encoding="utf-8").splitlines())
    return {pin(Requirement(line)) for line in lines if line and not line.startswith("-")}


def git_files() -> list[str]:
    proc = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    )  # fmt: skip
    return [name for name in proc.stdout.decode().split("\0") if name and (REPO / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("packaging")
    src, out = tmp / "src", tmp / "dist"
    for name in git_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-w", str(out), "."],
        cwd=src, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (built,) = out.glob("musetalk_live-*.whl")
    return built


def metadata(wheel: Path) -> tuple[dict[str, set[tuple]], list[str]]:
    """Requires-Dist of the wheel grouped by extra ("" for the library itself), and Provides-Extra."""
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(zf.read(name).decode())
    groups: dict[str, set[tuple]] = {}
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        extra = re.search(r'extra == "(\w+)"', str(req.marker or ""))
        groups.setdefault(extra.group(1) if extra else "", set()).add(pin(req))
    return groups, meta.get_all("Provides-Extra") or []


def test_the_wheel_holds_the_library_and_its_browser_page_only(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert {"musetalk/bot/static/index.html", "musetalk/bot/static/client.js"} <= set(names)
    assert {"musetalk/__init__.py", "musetalk/weights.py", "musetalk/bot/processor.py"} <= set(names)
    assert "musetalk/panel/engine.py" in names  # the panel's code ships; gradio comes with the `panel` extra
    tops = {name.split("/", 1)[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"musetalk"}, tops
    assert not [n for n in names if n.startswith(("tests/", "models/", "avatars/", "scripts/")) or "/tests/" in n]
    assert not [n for n in names if n.endswith((".pyc", ".pth", ".onnx", ".safetensors", ".tflite"))]
    # every Python module of the package is in it (a missing __init__.py would drop a subpackage)
    modules = {
        p.relative_to(REPO).as_posix() for p in (REPO / "musetalk").rglob("*.py") if "__pycache__" not in p.parts
    }
    assert modules <= set(names), sorted(modules - set(names))


def test_the_wheel_asks_for_the_pins_of_the_requirements_files(wheel):
    groups, extras = metadata(wheel)
    assert set(extras) == {"panel", "ray", "dev"}, extras
    runtime = read_requirements("requirements.txt")
    library = groups[""]
    assert {p[0] for p in library}.isdisjoint(PANEL_ONLY | TEST_ONLY), "gradio/scikit-image belong in extras"
    assert {p[0] for p in groups["panel"]} == PANEL_ONLY
    # requirements.txt = the library + the panel + its test-only line; the same pins, nothing more
    test_only = {p for p in runtime if p[0] in TEST_ONLY}
    packaged = library | groups["panel"] | test_only
    assert packaged == runtime, (
        f"pyproject only: {sorted(packaged - runtime)}; requirements.txt only: {sorted(runtime - packaged)}"
    )
    assert not library & groups["panel"]
    assert groups["ray"] == read_requirements("requirements-scale.txt")
    assert groups["dev"] == read_requirements("requirements-dev.txt") | test_only
    pipecat = next(p for p in library if p[0] == "pipecat-ai")
    assert pipecat[1] == ("daily", "runner", "silero", "webrtc") and pipecat[2] == "==1.14.0"


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a folder of its own (to put on PYTHONPATH): no source tree beside it."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target", str(target), str(wheel)],
        check=True, timeout=120,
    )  # fmt: skip
    return target


def test_an_installed_copy_serves_its_page_from_site_packages(installed, tmp_path):
    """Installed (no source tree on the path), the bot transport finds its page inside the package."""
    target = installed
    code = (
        "import musetalk, musetalk.bot.page as t; "
        "print(musetalk.__file__); print((t.STATIC_DIR / 'index.html').is_file(), (t.STATIC_DIR / 'client.js').is_file())"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, found = proc.stdout.strip().splitlines()[-2:]
    assert Path(where).is_relative_to(target), where
    assert found == "True True"


def test_an_installed_copy_checks_its_weights_without_the_source_tree(installed, tmp_path):
    """`python -m musetalk.weights check` from the installed wheel alone (no scripts/ beside it):
    the face models' sizes and hashes come from inside the package, and an empty models folder
    gets the listing of what is missing (exit 1), not a traceback."""
    target, models = installed, tmp_path / "models"
    env = {**os.environ, "PYTHONPATH": str(target), "MUSETALK_MODELS_DIR": str(models)}
    where = subprocess.run(
        [sys.executable, "-c", "import musetalk.weights as w; print(w.__file__)"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(target), where  # the installed copy, not this checkout
    proc = subprocess.run(
        [sys.executable, "-m", "musetalk.weights", "check"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    listing = proc.stdout.strip().splitlines()
    assert listing[0] == f"weights in {models.resolve()}:"
    out = "\n".join(listing)
    for name in ("face_detection_short_range.tflite", "face_landmark.tflite"):
        assert f"missing  required face-landmarks/{name}" in out, out
    assert "missing  required musetalkV15/unet.pth" in out
    assert "required files are missing or damaged: python -m musetalk.weights fetch" in out
