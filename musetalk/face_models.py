"""Fetch the offline face detection and face mesh models.

The two ``.tflite`` files ship inside the mediapipe 0.10.21 wheel (Apache-2.0). We take them
out of the wheel with ``pip download`` instead of installing mediapipe, because mediapipe
0.10.21 cannot be installed beside pipecat (protobuf pins) and newer mediapipe wheels no
longer carry the models. Only the package registry pip is configured for is contacted.

Usage::

    python -m musetalk.face_models [--models-dir models]
    python scripts/fetch_face_models.py [--models-dir models]   # the same, from a checkout

Idempotent: files that are already present with the expected size and checksum are kept.
Standard library only, so it runs before (or without) the rest of the project's packages;
``MODELS`` (sizes and hashes) is also what ``musetalk.weights`` checks the two files against.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MEDIAPIPE_VERSION = "0.10.21"
SUBDIR = "face-landmarks"

# file name -> (path inside the wheel, size in bytes, sha256). Sizes and hashes are those of
# the files in the mediapipe 0.10.21 wheels; they are identical across platforms.
MODELS: dict[str, tuple[str, int, str]] = {
    "face_detection_short_range.tflite": (
        "mediapipe/modules/face_detection/face_detection_short_range.tflite",
        229714,
        "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
    ),
    "face_landmark.tflite": (
        "mediapipe/modules/face_landmark/face_landmark.tflite",
        1242398,
        "1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814",
    ),
}

# Wheel selectors tried in order: the running interpreter first, then an explicit
# platform, so the script also works on Pythons mediapipe 0.10.21 has no wheel for.
# The .tflite files inside are the same in every wheel.
_FALLBACK_TARGETS: list[list[str]] = [
    [],
    ["--python-version", "3.11", "--platform", "manylinux_2_28_x86_64"],
    ["--python-version", "3.11", "--platform", "manylinux_2_17_x86_64"],
]

_NETWORK_ERRORS = (
    "NewConnectionError",
    "ConnectTimeout",
    "ConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "ProxyError",
    "SSLError",
    "Network is unreachable",
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_good(path: Path, size: int, sha: str) -> bool:
    return path.is_file() and path.stat().st_size == size and _sha256(path) == sha


def _download_wheel(tmp: Path) -> Path:
    """Download the mediapipe wheel into ``tmp`` with pip; exit non-zero with a clear message on failure."""
    logs: list[str] = []
    for extra in _FALLBACK_TARGETS:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            f"mediapipe=={MEDIAPIPE_VERSION}",
            "-d",
            str(tmp),
            *extra,
        ]
        print("running:", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        wheels = sorted(tmp.glob("mediapipe-*.whl"))
        if proc.returncode == 0 and wheels:
            return wheels[0]
        output = (proc.stdout + proc.stderr).strip()
        logs.append(output)
        if any(sig in output for sig in _NETWORK_ERRORS):
            break  # the registry is unreachable: other wheel selectors would fail the same way
    tail = "\n".join(logs[-1].splitlines()[-15:]) if logs else ""
    sys.stderr.write(
        f"\nERROR: pip could not download mediapipe=={MEDIAPIPE_VERSION} (needed only for its two "
        "face model files).\n"
        "Check that this machine can reach your Python package index (PyPI or the index set in "
        "PIP_INDEX_URL / pip.conf), then run this script again.\n"
        "Alternatively copy face_detection_short_range.tflite and face_landmark.tflite from any "
        f"mediapipe {MEDIAPIPE_VERSION} wheel into the models directory by hand.\n"
        f"Last pip output:\n{tail}\n"
    )
    raise SystemExit(2)


def fetch(models_dir: Path) -> Path:
    """Make sure both model files are in ``models_dir/face-landmarks``; return that directory."""
    target = models_dir / SUBDIR
    missing = {name: spec for name, spec in MODELS.items() if not _is_good(target / name, spec[1], spec[2])}
    if not missing:
        print(f"face models already present in {target}")
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mediapipe-wheel-") as tmpdir:
        wheel = _download_wheel(Path(tmpdir))
        with zipfile.ZipFile(wheel) as zf:
            for name, (member, size, sha) in missing.items():
                partial = target / (name + ".part")
                try:
                    with zf.open(member) as src, partial.open("wb") as dst:
                        shutil.copyfileobj(src, dst)
                except KeyError:
                    raise SystemExit(f"ERROR: {wheel.name} has no {member}; cannot extract {name}") from None
                if not _is_good(partial, size, sha):
                    partial.unlink(missing_ok=True)
                    raise SystemExit(
                        f"ERROR: {name} taken from {wheel.name} does not match the expected checksum; "
                        "the download may be corrupt. Run the script again."
                    )
                os.replace(partial, target / name)
                print(f"wrote {target / name} ({size} bytes)")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models-dir",
        default=os.environ.get("MUSETALK_MODELS_DIR", "models"),
        help="models directory; files go to <models-dir>/face-landmarks (default: $MUSETALK_MODELS_DIR or ./models)",
    )
    args = parser.parse_args(argv)
    fetch(Path(args.models_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
