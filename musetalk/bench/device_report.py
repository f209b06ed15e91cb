"""`python -m musetalk.bench report`: every figure of a device in one run, within a time budget.

    python -m musetalk.bench report [--size full|tiny] [--device auto|cuda|cpu] [--out DIR] [--budget-s S] [--json]

One process builds the models once (random weights: `--size full` MuseTalk v1.5's published
architectures, `--size tiny` the test models) and runs the sections in order, each with its share
of the budget (`musetalk.bench.budget`): device, generation (frames/s per batch size and exactness
against the fp32 reference), stages (cost per frame from audio features to video encode),
first_mouth (first TTS audio -> first moving mouth), memory (models, each extra session), sessions
(largest N served at 25 fps, shared service vs one per session) and speedups (the opt-ins beside
the default). A measurement that would not fit the time left is skipped and the report says so.
After every section `report.json` and `report.md` are rewritten whole (temp file + `os.replace`),
so a run stopped from outside still leaves a readable report of what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from musetalk.bench.budget import Budget, Deadline
from musetalk.bench.context import Context, ReportSettings, build_context
from musetalk.bench.generation import run_generation
from musetalk.bench.machine import device_info, free_cuda
from musetalk.bench.markdown import render_markdown
from musetalk.bench.memory import run_memory
from musetalk.bench.mouth import run_first_mouth
from musetalk.bench.report import json_safe
from musetalk.bench.sessions import run_sessions
from musetalk.bench.speedups import run_speedups
from musetalk.bench.stages import run_stages

Section = Callable[[Context, Deadline], dict[str, Any]]


def run_device(ctx: Context, deadline: Deadline) -> dict[str, Any]:
    return {**device_info(ctx.device, ctx.models.dtype), "size": ctx.settings.size, "build": ctx.build}


# (name, what it measures, its weight in the budget)
SECTIONS: tuple[tuple[str, Section, float], ...] = (
    ("device", run_device, 0.05),
    ("generation", run_generation, 3.0),
    ("stages", run_stages, 0.7),
    ("first_mouth", run_first_mouth, 1.2),
    ("memory", run_memory, 1.2),
    ("sessions", run_sessions, 2.5),
    ("speedups", run_speedups, 1.5),
)
SECTION_NAMES = tuple(name for name, _, _ in SECTIONS)


def write_atomic(path: Path, text: str) -> None:
    """The whole file or the previous one, never half of it: a temp file beside it, then `os.replace`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    write_atomic(out / "report.md", render_markdown(report))


def _run_section(ctx: Context, name: str, fn: Section, budget: Budget) -> dict[str, Any]:
    start = time.monotonic()
    if budget.left() < 1.0:
        return {"status": "skipped", "reason": f"budget used up ({budget.elapsed():.0f} of {budget.total_s:.0f} s)"}
    deadline = budget.section(name)
    ctx.log(f"== {name} ({deadline.left():.0f} s of the budget)")
    try:
        data = fn(ctx, deadline)
    except Exception as exc:  # one broken section must not lose the others' figures
        ctx.log(traceback.format_exc())
        free_cuda(ctx.device)  # after an out-of-memory error the next sections still get the GPU
        tail = traceback.format_exc().strip().splitlines()[-6:]
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "traceback": tail,
                "seconds": time.monotonic() - start}  # fmt: skip
    ctx.results[name] = data
    status = "partial" if data.get("skipped") else "ok"
    return {"status": status, "seconds": time.monotonic() - start, "data": data}


def run_report(settings: ReportSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every section within `settings.budget_s`; write and return the report."""
    budget = Budget(settings.budget_s, {name: weight for name, _, weight in SECTIONS})
    report: dict[str, Any] = {
        "schema": 1,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"size": settings.size, "device": settings.device, "budget_s": settings.budget_s, "seed": settings.seed},
        "complete": False,
        "sections": {name: {"status": "pending"} for name in SECTION_NAMES},
    }  # fmt: skip
    ctx = build_context(settings, log)
    for name, fn, _ in SECTIONS:
        report["sections"][name] = _run_section(ctx, name, fn, budget)
        report["elapsed_s"] = budget.elapsed()
        write_report(report, settings.out)
    report["complete"] = True
    report["over_budget"] = budget.elapsed() > settings.budget_s
    write_report(report, settings.out)
    log(f"report written to {settings.out}/report.md and report.json in {budget.elapsed():.0f} s")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m musetalk.bench report", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="random models: published sizes or tiny")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu | cuda:N")
    p.add_argument("--out", type=Path, default=Path("bench-report"), help="folder for report.json and report.md")
    p.add_argument("--budget-s", type=float, default=480.0, help="seconds the whole run may take (default 480)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: PyTorch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = ReportSettings(size=args.size, device=args.device, out=args.out, budget_s=args.budget_s, seed=args.seed)
    report = run_report(settings, lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(json_safe(report), indent=2, allow_nan=False) if args.json else render_markdown(report))
    return 0
