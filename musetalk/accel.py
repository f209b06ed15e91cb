"""Inference speed-ups for a loaded `Models`: exact ones by default, the rest opt-in.

Call `optimize_for_inference(models)` once after loading (see `musetalk.bench` for the
measurements behind each choice). The defaults leave every output byte unchanged: generated
frames stay byte-identical to MuseTalk's own loop run with the same weights on the same
device, thread count and batch size (`tests/test_generate_exact.py` checks this).

Exact, on by default:

* `keep_memory` (CPU, glibc only): freed tensor memory stays in the process heap instead of
  going back to the OS. Without it every large activation (the batch-8 VAE decoder allocates
  tensors of 256 MiB) is a fresh `mmap` whose pages the kernel zero-fills on first touch:
  about 0.9 M page faults per two decoded frames. Measured on 2 Xeon cores, batch 8, model
  step only: 2550 -> 2195 ms/frame (UNet 592 -> 552, decode 1957 -> 1643). Process-wide
  while on (the heap keeps its high-water mark, ~2-3 GiB at batch 8), so it belongs in a
  process that serves models, not in a library import.

Exact but off by default, because it measured slower:

* `lean_blocks`: diffusers' ResnetBlock2D recomputed with the same operations in the same
  order, but SiLU in place, the residual added in place and the no-op `/ 1.0` dropped
  (x / 1.0 == x and a + b == b + a in IEEE arithmetic, so the bits are the same); only when
  autograd is off. Fewer buffers, yet 3-4 % slower per frame on the CPU above (2550 -> 2623
  alone, 2195 -> 2287 with `keep_memory`).

Opt-in, because they change results at the float-rounding level (measured by the bench):

* `channels_last`: NHWC convolution weights. On this CPU oneDNN picks other kernels for NHWC:
  outputs differ by ~1e-5 (some uint8 pixels flip) and it is not faster here (2400 vs 2287
  ms/frame); on CUDA it is the usual fast path for convolutions.
* `approx_decode`: the VAE decoder under bf16 autocast on CPUs with native bf16 (AMX or
  AVX512-BF16), ~3x faster, ~50 dB PSNR against the exact decode with random weights;
  on CUDA (already fp16) it only switches the decoder to channels_last.
* `compile`: `torch.compile` of the UNet and the VAE decoder. Inductor fuses and reorders
  reductions: on the tiny test models 65 output values differed by 1, and the first call
  compiled for ~2 minutes on 2 CPU cores.

Measured and rejected: prepacked (pre-reordered) oneDNN convolution weights are exact but
~2 % slower. Thread count and batch size are no free knobs: per-sample results are the same
for UNet/decoder batches of 2, 4 and 8, but batch 1 and other thread counts change the
float results (oneDNN/MKL pick other kernels and reduction orders).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import dataclasses
import sys
import types
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn

from musetalk.latents import bf16_decode_supported

if TYPE_CHECKING:  # annotations only: `models.load_models` calls `optimize_for_inference`
    from musetalk.models import Models

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_GLIBC_DEFAULT_MMAP_MAX = 65536
# glibc's dynamic thresholds settle at these values once large blocks have been freed.
_GLIBC_SETTLED_MMAP_THRESHOLD = 32 * 1024 * 1024
_GLIBC_SETTLED_TRIM_THRESHOLD = 2 * _GLIBC_SETTLED_MMAP_THRESHOLD
_INT_MAX = 2**31 - 1

_libc: Any = None
_memory_kept = False


def _glibc() -> Any:
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                lib.malloc_trim.argtypes = [ctypes.c_size_t]
                lib.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl has mallopt as a stub)
                _libc = lib
            except (OSError, AttributeError):
                _libc = False
    return _libc or None


def keep_freed_memory(enabled: bool = True) -> bool:
    """Keep freed heap memory in the process (True) or return to glibc's usual behaviour (False).

    Affects the whole process. Returns whether it could be applied (glibc Linux only).
    Disabling restores the thresholds glibc settles at by itself and trims the heap; the
    bench uses it to run the reference loop under the allocator behaviour it normally has.
    """
    global _memory_kept
    libc = _glibc()
    if libc is None:
        return False
    if enabled:
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    else:
        ok = (
            libc.mallopt(_M_MMAP_MAX, _GLIBC_DEFAULT_MMAP_MAX) == 1
            and libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_SETTLED_MMAP_THRESHOLD) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_SETTLED_TRIM_THRESHOLD) == 1
        )
        libc.malloc_trim(0)
    _memory_kept = enabled and ok
    return ok


def memory_kept() -> bool:
    """Whether `keep_freed_memory(True)` is in force."""
    return _memory_kept


def allocator_tunable() -> bool:
    """Whether `keep_freed_memory` can act here (a glibc Linux process)."""
    return _glibc() is not None


# ------------------------------------------------------------------ lean ResNet blocks
def _lean_resnet_forward(
    self: nn.Module, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs
):
    """ResnetBlock2D.forward (default time-embedding norm, no resampling, scale 1), fewer buffers."""
    if torch.is_grad_enabled() or args or kwargs:
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    hidden = F.silu(self.norm1(input_tensor), inplace=True)
    hidden = self.conv1(hidden)
    if self.time_emb_proj is not None and temb is not None:
        hidden.add_(self.time_emb_proj(F.silu(temb))[:, :, None, None])
    hidden = F.silu(self.norm2(hidden), inplace=True)
    hidden = self.conv2(self.dropout(hidden))
    shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
    return hidden.add_(shortcut)


def _lean_compatible(block: nn.Module) -> bool:
    return (
        getattr(block, "time_embedding_norm", None) == "default"
        and getattr(block, "upsample", 1) is None
        and getattr(block, "downsample", 1) is None
        and float(getattr(block, "output_scale_factor", 0.0)) == 1.0
        and not getattr(block, "skip_time_act", True)
        and isinstance(getattr(block, "nonlinearity", None), nn.SiLU)
        and isinstance(getattr(block, "norm1", None), nn.GroupNorm)
        and isinstance(getattr(block, "norm2", None), nn.GroupNorm)
        and "forward" not in vars(block)
    )


def use_lean_blocks(module: nn.Module) -> int:
    """Switch every compatible diffusers ResnetBlock2D inside `module` to the lean forward."""
    from diffusers.models.resnet import ResnetBlock2D

    count = 0
    for block in module.modules():
        if type(block) is ResnetBlock2D and _lean_compatible(block):
            block.forward = types.MethodType(_lean_resnet_forward, block)
            count += 1
    return count


# ------------------------------------------------------------------ helpers
def module_copy_sharing_weights(module: nn.Module) -> nn.Module:
    """New module objects (so they can be changed freely) that share the original's tensors."""
    memo: dict[int, Any] = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    return copy.deepcopy(module, memo)


def _channels_last_weights(module: nn.Module) -> None:
    """NHWC weights as new Parameters (the originals, possibly shared, stay as they are)."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            conv.weight = nn.Parameter(
                conv.weight.detach().contiguous(memory_format=torch.channels_last), requires_grad=False
            )


def bf16_cpu_supported() -> bool:
    """Native bf16 on this CPU (AMX or AVX512-BF16), where a bf16 decode is cheaper."""
    return bf16_decode_supported("cpu")


class _AutocastDecoder(nn.Module):
    """Runs a VAE decoder under reduced-precision autocast; returns the input's dtype.

    The same computation as `latents.decode_latents_approx` (only the decoder is autocast).
    """

    def __init__(self, decoder: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.inner = decoder
        self.device_type = device_type
        self.autocast_dtype = dtype

    def forward(self, z: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.autocast_dtype):
            out = self.inner(z, *args, **kwargs)
        return out.to(z.dtype)


# ------------------------------------------------------------------ entry point
def optimize_for_inference(
    models: Models,
    *,
    keep_memory: bool | None = None,
    lean_blocks: bool = False,
    channels_last: bool = False,
    approx_decode: bool = False,
    compile: bool = False,
    copy_modules: bool = False,
) -> Models:
    """Apply speed-ups to `models` and return them (see the module docstring for each).

    The defaults are exact. `keep_memory=None` means: on for CPU models, off on CUDA.
    `copy_modules=True` leaves the given modules untouched and returns new UNet/VAE module
    objects sharing their weights (the bench runs the reference loop on the untouched ones).
    """
    unet, vae = models.unet, models.vae
    if copy_modules:
        unet, vae = module_copy_sharing_weights(unet), module_copy_sharing_weights(vae)
    if keep_memory is None:
        keep_memory = models.device.type == "cpu"
    if keep_memory and not keep_freed_memory(True):
        logger.debug("keep_memory: not a glibc Linux process, allocator left as it is")
    if lean_blocks:
        use_lean_blocks(unet)
        use_lean_blocks(vae.decoder)
    if channels_last:
        _channels_last_weights(unet)
        _channels_last_weights(vae)
    if approx_decode:
        if models.device.type == "cpu":
            if bf16_cpu_supported():
                vae.decoder = _AutocastDecoder(vae.decoder, "cpu", torch.bfloat16)
            else:
                logger.warning("approx_decode: this CPU has no native bf16; the decoder stays fp32")
        elif not channels_last:
            _channels_last_weights(vae.decoder)
    if compile:
        unet = torch.compile(unet)
        vae.decoder = torch.compile(vae.decoder)
    return dataclasses.replace(models, unet=unet, vae=vae)
