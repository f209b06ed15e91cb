#!/usr/bin/env bash
# Fetch the MuseTalk v1.5 weights into ./models (or $MUSETALK_MODELS_DIR): a thin wrapper
# around `python -m musetalk.weights fetch`, the same code the panel's "Fetch weights" button
# and the Hugging Face Space start-up use. Present files are kept, damaged ones fetched again,
# broken transfers resume. When the model hub cannot be reached this prints one line per file
# and exits 0: the app starts and tells what it still needs.
# Honours HF_ENDPOINT (a hub mirror) and HF_TOKEN. MUSETALK_OFFLINE=1 (and CI=true) skips the network.
# Extra arguments go to the fetch command (e.g. --required-only). MUSETALK_PYTHON: the interpreter (default .venv).
set -uo pipefail
cd "$(dirname "$0")"
PY="${MUSETALK_PYTHON:-.venv/bin/python}"; [ -x "$PY" ] || PY=python3
"$PY" -m musetalk.weights fetch "$@" || echo "fetch them later with: bash download_weights.sh   (set HF_ENDPOINT for a mirror)"
exit 0
