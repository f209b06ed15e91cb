#!/usr/bin/env bash
# Command 1 of the README: install everything into ./.venv, fetch missing weights, start.
# Safe to run again: installs are skipped when up to date, present weights are kept.
# Set MUSETALK_NO_START=1 (CI does, via CI=true) to install without starting.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.requirements.sha
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing Python packages (pip only; first run takes a few minutes)"
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -r requirements-dev.txt
  echo "$want" > "$stamp"
else
  echo "==> Python packages up to date"
fi

# The built-in voice (tts.service: espeak) speaks with the espeak-ng program (Debian/Ubuntu package).
if ! command -v espeak-ng >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      SUDO="sudo -n"
    elif command -v sudo >/dev/null 2>&1 && [ -t 0 ]; then
      SUDO="sudo"  # asks for the password on this terminal
    else
      SUDO="none"
    fi
  fi
  if [ "$SUDO" = "none" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "!! espeak-ng is not installed: the built-in voice needs it (sudo apt-get install espeak-ng)"
  else
    echo "==> installing espeak-ng with apt-get (the built-in voice)"
    if ! { $SUDO apt-get update -qq \
        && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends espeak-ng >/dev/null; }; then
      echo "!! could not install espeak-ng: the built-in voice needs it (sudo apt-get install espeak-ng)"
    fi
  fi
fi

echo "==> checking weights"
bash download_weights.sh || echo "!! some weights are missing; see above (the app still starts and says what is missing)"

if [ "${MUSETALK_NO_START:-}" = "1" ] || [ "${CI:-}" = "true" ]; then
  echo "==> installed (not starting: CI or MUSETALK_NO_START=1)"
  exit 0
fi

if [ -f app.py ]; then
  echo "==> starting the control panel on http://127.0.0.1:7860"
  exec python app.py "$@"
fi
echo "==> ready. Try:"
echo "    .venv/bin/python -m musetalk prepare my_video.mp4 --name me"
echo "    .venv/bin/python -m musetalk render me speech.wav -o out.mp4"
exec python -m musetalk --help
