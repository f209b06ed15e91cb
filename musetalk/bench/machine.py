"""What the report says about the machine: the device, the library versions, memory readings."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import torch

from musetalk.bench.timing import device_name

PACKAGES = ("torch", "transformers", "diffusers", "accelerate", "huggingface_hub", "numpy", "opencv-python-headless")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _host_memory_mb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def device_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Name, memory, torch / CUDA versions and the fast path's dtype."""
    info: dict[str, Any] = {
        "device": str(device), "name": device_name(device), "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": None, "python": platform.python_version(),
        "cpus": os.cpu_count(), "host_memory_mb": _host_memory_mb(), "torch_threads": torch.get_num_threads(),
        "packages": {name: _version(name) for name in PACKAGES},
    }  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            memory_mb=props.total_memory / 2**20, capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version(),
        )  # fmt: skip
    else:
        info["memory_mb"] = info["host_memory_mb"]
    return info


def rss_mb() -> float:
    """This process's resident memory now (VmRSS), MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def memory_now(device: torch.device) -> dict[str, float | None]:
    """GPU memory allocated now and its peak since the last reset (CUDA), and the process RSS."""
    gpu = peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        gpu = torch.cuda.memory_allocated(device) / 2**20
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    return {"gpu_mb": gpu, "gpu_peak_mb": peak, "rss_mb": rss_mb()}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free_cuda(device: torch.device) -> None:
    """Give cached blocks back after a large allocation (OOM, dropped models)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def parameter_mb(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
