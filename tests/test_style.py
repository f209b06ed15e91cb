"""The code stays as `ruff format` writes it and `ruff check` passes (pyproject.toml's [tool.ruff])."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_ruff_format_leaves_every_file_as_it_is():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, f"run `ruff format .`:\n{result.stdout}{result.stderr}"


def test_ruff_check_finds_nothing():
    result = ruff("check", ".")
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"
