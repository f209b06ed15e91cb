#!/usr/bin/env bash
# The one script to run on a lent GPU machine: no network there, so it installs only the wheels in .whl/
# (made beforehand by scripts/device_wheels.sh, carried with the working tree) into a folder of its own,
# then runs the device report on full-size random weights with the machine's python3 and prints it.
# Under 9 minutes in all: the report stops starting measurements at its budget (BUDGET_S), and a hard
# limit (LIMIT_S) ends it regardless; report.json and report.md are rewritten after every section.
#
#   bash scripts/device_check.sh                                       # on the GPU machine
#   DEVICE=cpu SIZE=tiny BUDGET_S=60 bash scripts/device_check.sh      # a dry run of the plumbing, anywhere
#
# Writes "$OUT/report/report.md", report.json and log.txt (OUT: the device tool's output folder;
# default ./device-report). Settings: PYTHON (python3), SIZE (full), DEVICE (cuda), BUDGET_S (450),
# LIMIT_S (510), SITE (where the wheels go: a fresh temporary folder).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SIZE=${SIZE:-full}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-450}
LIMIT_S=${LIMIT_S:-510}
REPORT="${OUT:-device-report}/report"
mkdir -p "$REPORT"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  SITE=${SITE:-$(mktemp -d /tmp/musetalk-site.XXXXXX)}
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
else
  echo "no wheels in .whl/ (scripts/device_wheels.sh makes them where PyPI is reachable): using what $PY has"
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L
"$PY" -c 'import sys, torch, transformers, diffusers; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "transformers", transformers.__version__, "diffusers", diffusers.__version__)' \
  || { echo "the engine's packages do not import" >&2; exit 1; }

timeout --kill-after=10 "$LIMIT_S" "$PY" -m musetalk.bench report --size "$SIZE" --device "$DEVICE" \
  --out "$REPORT" --budget-s "$BUDGET_S" >/dev/null 2> >(tee "$REPORT/log.txt" >&2)
rc=$?
sleep 0.5  # the log's tee finishes
[ $rc -eq 0 ] || echo "the report exited with $rc (124 or 137: stopped at ${LIMIT_S} s); what it wrote follows"
if [ -f "$REPORT/report.md" ]; then
  cat "$REPORT/report.md"
else
  echo "no report.md was written"
fi
exit $rc
