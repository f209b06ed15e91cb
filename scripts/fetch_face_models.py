#!/usr/bin/env python3
"""Fetch the offline face detection and face mesh models.

A wrapper around ``python -m musetalk.face_models`` (where the code, sizes and hashes live, so
an installed wheel has them too) for a checkout: it needs nothing but the standard library and
this repository, so it runs before (or without) the project's packages.

Usage::

    python scripts/fetch_face_models.py [--models-dir models]
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # this checkout's musetalk, installed or not

from musetalk.face_models import MODELS, fetch, main  # noqa: E402

__all__ = ["MODELS", "fetch", "main"]

if __name__ == "__main__":
    sys.exit(main())
