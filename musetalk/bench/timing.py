"""Measuring helpers of the benchmarks: stage timers, wall/CPU timing, peak matmul rate, FLOP counts, frame diffs."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from musetalk.testing import meta_models


# ====================================================================== timing helpers
class StageTimer:
    """Accumulates time per stage: forward hooks around modules, or a context for CPU work.

    On CUDA the module stages record events (no synchronisation, so overlap is not disturbed)
    and are summed after `torch.cuda.synchronize()`.
    """

    def __init__(self, device: torch.device, *, enabled: bool = True):
        self.cuda = torch.device(device).type == "cuda"
        self.enabled = enabled
        self.seconds: dict[str, float] = {}
        self._events: dict[str, list[tuple[Any, Any]]] = {}
        self._handles: list[Any] = []
        self._open: dict[str, Any] = {}

    def hook(self, stage: str, first: torch.nn.Module, last: torch.nn.Module | None = None) -> None:
        """Time from the start of `first`'s forward to the end of `last`'s (default: the same module)."""

        def start(*_):
            if self.enabled:
                self._open[stage] = self._mark()

        def stop(*_):
            if self.enabled and stage in self._open:
                self._close(stage, self._open.pop(stage))

        self._handles.append(first.register_forward_pre_hook(start))
        self._handles.append((last or first).register_forward_hook(stop))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _close(self, stage: str, begin: Any) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.setdefault(stage, []).append((begin, end))
        else:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - begin

    @contextmanager
    def cpu_stage(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.enabled:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

    def totals(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            for stage, pairs in self._events.items():
                self.seconds[stage] = self.seconds.get(stage, 0.0) + sum(a.elapsed_time(b) for a, b in pairs) / 1000
            self._events.clear()
        return dict(self.seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_stat() -> tuple[int, int] | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(vals), vals[3] + vals[4]


@dataclass
class Timed:
    wall: float
    cpu_share: float  # this process's CPU time / (wall x torch threads)
    other_load: float | None  # share of the machine's CPU used by other processes meanwhile
    result: Any = field(default=None, repr=False)
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage in this pass


def timed(fn: Callable[[], Any], device: torch.device) -> Timed:
    _sync(device)
    stat0, cpu0, t0 = _proc_stat(), sum(os.times()[:2]), time.perf_counter()
    result = fn()
    _sync(device)
    wall = time.perf_counter() - t0
    cpu, stat1 = sum(os.times()[:2]) - cpu0, _proc_stat()
    other = None
    if stat0 and stat1 and stat1[0] > stat0[0]:
        ticks = os.sysconf("SC_CLK_TCK")
        total, idle = stat1[0] - stat0[0], stat1[1] - stat0[1]
        other = max(0.0, (total - idle - cpu * ticks) / total)
    return Timed(wall, cpu / max(wall * torch.get_num_threads(), 1e-9), other, result)


def peak_matmul_gflops(device: torch.device, *, n: int | None = None, repeats: int = 5) -> tuple[float, str]:
    """Best-of-`repeats` GFLOP/s of one large square `torch.mm` (fp16 on CUDA, fp32 on CPU)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 4096)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats if device.type == "cpu" else 10 * repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9, f"torch.mm {n}x{n} {str(dtype).removeprefix('torch.')}"


def count_gflop(tiny: bool) -> dict[str, float]:
    """GFLOP per call, counted by FlopCounterMode on meta-device copies (shapes only, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae, whisper = meta_models(tiny)
    meta = torch.device("meta")
    width = int(unet.config.cross_attention_dim)
    out = {}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            unet(torch.zeros(1, 8, 32, 32, device=meta), torch.zeros(1, dtype=torch.long, device=meta),
                 encoder_hidden_states=torch.zeros(1, 50, width, device=meta))  # fmt: skip
        out["unet"] = fc.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as fc:
            vae.decode(torch.zeros(1, 4, 32, 32, device=meta))
        out["vae_decode"] = fc.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as fc:
            whisper(torch.zeros(1, 80, 3000, device=meta), output_hidden_states=True)
        out["features_window"] = fc.get_total_flops() / 1e9
    return out


def compare_frames(ours: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> tuple[bool, int, int]:
    """(byte-identical, max abs difference, number of differing pixel values)."""
    if len(ours) != len(reference):
        return False, 255, -1
    max_diff, differing = 0, 0
    for a, b in zip(ours, reference):
        if a.shape != b.shape:
            return False, 255, -1
        d = np.abs(a.astype(np.int16) - b.astype(np.int16))
        max_diff = max(max_diff, int(d.max()))
        differing += int(np.count_nonzero(d))
    return max_diff == 0, max_diff, differing


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of uint8 images; None when identical (infinite)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(255.0**2 / mse)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} CPUs)"
