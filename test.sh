#!/usr/bin/env bash
# Command 2 of the README: run the whole test suite (installs what the tests need first).
# Arguments go to pytest: `bash test.sh -m "not slow"` is the fast lane (no browser, Ray, kill or other
# long tests; under 3 minutes on 2 cores), `bash test.sh` runs everything. Two workers, a file at a time each,
# the real-time tests last (tests/conftest.py); `bash test.sh -n 0` runs them in one process.
set -euo pipefail
cd "$(dirname "$0")"

need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
command -v sox >/dev/null 2>&1 || need_apt+=(sox)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing test tools with apt: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  MUSETALK_NO_START=1 bash run.sh
fi
# The optional Ray Serve extra, so the Ray backend's tests run too (the app's default path needs none of it).
scale_stamp=.venv/.requirements-scale.sha
scale_want=$(sha256sum requirements-scale.txt | cut -d' ' -f1)
if [ "$(cat "$scale_stamp" 2>/dev/null)" != "$scale_want" ]; then
  echo "==> installing the optional Ray Serve extra (requirements-scale.txt)"
  .venv/bin/python -m pip install --quiet -r requirements-scale.txt
  echo "$scale_want" > "$scale_stamp"
fi
.venv/bin/python scripts/fetch_face_models.py --models-dir "${MUSETALK_MODELS_DIR:-models}"
exec .venv/bin/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder "$@"
