"""Generation benchmark: `python -m musetalk.bench [--device D] [--batch N] [--frames N] [--json] [--approx] [--tiny]`.

`report [--size full|tiny] [--device D] [--out DIR] [--budget-s S] [--json]` writes the whole device
report instead (`musetalk.bench.device_report`): every figure of a GPU in one budgeted run.

`--streams N[,M...] [--find-max]` runs the live benchmark instead: N sessions paced in real time
against the shared generation service, next to one service per session (`musetalk.bench.streams`);
`--backend ray[://ADDRESS]` also runs them on the Ray Serve deployment.

What the generation benchmark measures: `musetalk.bench.speed`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

from musetalk import accel
from musetalk.bench.official import OFFICIAL_BATCH
from musetalk.bench.report import format_report, json_safe
from musetalk.bench.speed import BenchOptions, resolve_device, run
from musetalk.bench.timing import device_name
from musetalk.testing import build_random_models


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from musetalk.bench.device_report import main as report_main

        return report_main(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m musetalk.bench",
        description=__doc__.split("\n\n")[0],
        epilog="python -m musetalk.bench report --help: the whole device report in one budgeted run.",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--batch", type=int, default=OFFICIAL_BATCH, help="our generator's batch size (the official loop uses 8)"
    )
    p.add_argument("--frames", type=int, default=16, help="frames generated per timed pass")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.add_argument("--approx", action="store_true", help="also measure the opt-in approximate decode")
    p.add_argument("--tiny", action="store_true", help="tiny architectures (tests, smoke checks): not representative")
    p.add_argument("--no-accel", dest="accel", action="store_false", help="our generator on the plain models")
    p.add_argument(
        "--no-keep-memory", dest="keep_memory", action="store_false", help="accel without the allocator setting"
    )
    p.add_argument("--lean-blocks", action="store_true", help="exact in-place ResNet blocks (measured slower on CPU)")
    p.add_argument("--channels-last", action="store_true", help="opt-in: NHWC conv weights (not byte-exact on CPU)")
    p.add_argument("--compile", action="store_true", help="opt-in: torch.compile the UNet and the VAE decoder")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the one-batch warm-up of both paths")
    p.add_argument("--repeats", type=int, default=1, help="timed passes of each path, alternating; the best counts")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: PyTorch's choice)")
    p.add_argument("--seed", type=int, default=0)
    live = p.add_argument_group("live streams (musetalk.bench.streams)")
    live.add_argument("--streams", type=str, default=None, help="N (or N,M,...) sessions paced in real time")
    live.add_argument("--find-max", action="store_true", help="search the largest N with >= 24 fps each, < 1%% late")
    live.add_argument("--size", choices=("tiny", "full"), default=None, help="random models (default: full on CUDA)")
    live.add_argument("--seconds", type=float, default=10.0, help="speech per session and N")
    live.add_argument("--latency-budget", type=float, default=0.2, help="seconds a frame may wait for the model")
    live.add_argument("--service-batch", type=int, default=None, help="the service's batch size (8 CUDA / 4 CPU)")
    live.add_argument("--whisper-window", type=float, default=30.0, help="seconds of audio per whisper pass")
    live.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip one-service-per-session runs")
    live.add_argument("--backend", default="inproc", help="inproc, or ray[://ADDRESS]: also the Ray Serve deployment")
    live.add_argument("--replicas", type=int, default=2, help="with --backend ray: Serve replicas (one per GPU)")
    args = vars(p.parse_args(argv))
    streams = args.pop("streams")
    live_args = {k: args.pop(k) for k in ("find_max", "size", "seconds", "latency_budget", "service_batch", "whisper_window", "baseline",
                                    "backend", "replicas")}  # fmt: skip
    as_json = args.pop("json")
    if streams is not None or live_args["find_max"]:
        return _main_streams(streams or "64", live_args, args, as_json)
    if args["frames"] < 1 or args["batch"] < 1:
        p.error("--frames and --batch must be >= 1")
    opts = BenchOptions(**args)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if as_json else (lambda s: print(s, flush=True))
    rep = run(opts, log)
    print(json.dumps(rep, indent=2) if as_json else "\n" + format_report(rep))
    return 0


def _main_streams(streams: str, live: dict[str, Any], args: dict[str, Any], as_json: bool = False) -> int:
    """`--streams`: paced live sessions against the generation service (see musetalk.bench.streams).

    With `--json` the table and progress go to stderr and stdout is one JSON object."""
    from musetalk.bench.streams import StreamsOptions, bench_avatars, main_streams, result_dict

    device = resolve_device(args["device"])
    if args["threads"] or device.type == "cpu":  # render and live at the thread count the service uses
        from musetalk.live.service import GenerationService, ServiceSettings

        torch.set_num_threads(args["threads"] or GenerationService.default_torch_threads(ServiceSettings()))
    size = live["size"] or ("full" if device.type == "cuda" else "tiny")
    counts = [int(n) for n in streams.split(",")]
    if min(counts) < 1:
        raise SystemExit("--streams takes positive session counts")
    models = accel.optimize_for_inference(build_random_models(tiny=size == "tiny", device=device, seed=args["seed"]))
    opts = StreamsOptions(
        seconds=live["seconds"], latency_budget_s=live["latency_budget"], batch_size=live["service_batch"],
        whisper_window_s=live["whisper_window"],
    )  # fmt: skip
    avatars = bench_avatars(opts, args["seed"])
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if as_json else (lambda s: print(s, flush=True))
    log(f"{size} random models on {device_name(device)} ({models.describe()}), {torch.get_num_threads()} torch threads, "
        f"{opts.seconds:.0f} s of speech per session, latency budget {opts.latency_budget_s} s")  # fmt: skip
    if live["backend"] != "inproc":
        from musetalk.bench.streams import main_streams_ray_cli

        rows = main_streams_ray_cli(
            live["backend"], models, avatars, counts, opts, live["replicas"], size, args["seed"], log=log
        )
    else:
        rows = main_streams(models, avatars, counts, opts, find=live["find_max"], baseline=live["baseline"], log=log)
    if as_json:
        config = {"device": str(device), "device_name": device_name(device), "size": size, "dtype": str(models.dtype)[6:],
                  "threads": torch.get_num_threads(), "backend": live["backend"], **dataclasses.asdict(opts)}  # fmt: skip
        out: dict[str, Any] = {"config": config, "runs": [result_dict(r) for r in rows]}
        if live["find_max"] and live["backend"] == "inproc":
            out["largest_n"] = max((r.streams for r in rows if r.shared and r.good), default=0)
        print(json.dumps(json_safe(out), indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
