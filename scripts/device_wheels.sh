#!/usr/bin/env bash
# Run here, where PyPI is reachable: downloads into .whl/ the wheels that `python -m musetalk.bench report`
# needs beyond what a lent GPU machine already has (Python 3.12, torch, transformers, accelerate,
# safetensors, huggingface_hub, numpy, opencv-python-headless, pillow, pyyaml, psutil, ...; no network
# there). scripts/device_check.sh installs them on that machine. Wheels are never committed (.gitignore).
#
#   bash scripts/device_wheels.sh        # then: the device tool runs `bash scripts/device_check.sh`, carrying .whl
#
# What the report imports that such a machine lacks: diffusers (the UNet and the VAE) and loguru (our logs).
# Not carried: imageio-ffmpeg (a 68 MB wheel, over the 64 MiB that travels; the report's video-encode stage
# uses an ffmpeg on the PATH, else OpenCV's writer, and says which), and pipecat, gradio, ray, moviepy,
# soundfile, ai-edge-litert (the report imports none of them). Versions are requirements.txt's pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
LIMIT_MB=64
NAMES=(diffusers loguru)

specs=()
for name in "${NAMES[@]}"; do
  pin=$(grep -iE "^${name}==" requirements.txt | head -1 | tr -d '[:space:]')
  [ -n "$pin" ] || { echo "no pin for $name in requirements.txt" >&2; exit 1; }
  specs+=("$pin")
done

rm -rf .whl
mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${specs[@]}"

ls -l .whl/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "total: $total bytes ($(( (total + 1048575) / 1048576 )) MiB) in $(ls .whl/*.whl | wc -l) wheels"
if [ "$total" -gt $(( LIMIT_MB * 1048576 )) ]; then
  echo "over the ${LIMIT_MB} MiB a device call may carry (the working tree counts too)" >&2
  exit 1
fi
