"""Generation benchmark: `python -m musetalk.bench [--device D] [--batch N] [--frames N] [--json] [--approx] [--tiny]`.

`--streams N[,M...] [--find-max]` runs the live benchmark instead: N sessions paced in real time
against the shared generation service, next to one service per session (`musetalk.bench_streams`).

Full-size MuseTalk v1.5 architectures with random weights (no weight files needed) on a
synthetic 720p avatar. One run measures, in the same process and on the same inputs:

* our generator (`LipSyncGenerator.generate` on models passed through
  `accel.optimize_for_inference`) against an "official loop" written here after MuseTalk's
  real-time script: UNet at batch 8, the full VAE decode with its numpy uint8 conversion,
  then the full-frame PIL blend per frame, nothing overlapped, allocator left as glibc has it;
* whether our frames are byte-identical to the official loop's (max abs diff, pixels differing);
* per-stage ms/frame. Features: the whisper-tiny encoder (log-mel included) on one 30 s window,
  amortised over the 750 video frames that window covers at 25 fps, as on the file path;
  UNet and VAE decode (forward hooks around them); blend (per frame);
* GFLOP per frame (`FlopCounterMode` on meta-device copies of the models: nothing runs), the
  same run's peak from a large `torch.mm` (fp32 on CPU, fp16 on CUDA) and each stage's
  achieved GFLOP/s as a percentage of it.

`--approx` adds the opt-in approximate decode (`accel.optimize_for_inference(approx_decode=True)`:
bf16 autocast on CPUs with native bf16), its speed and its PSNR against the exact path on the same
latents. `--tiny` runs the same code with tiny networks for tests and smoke checks: its figures
are not representative. On CUDA everything runs in fp16 and the timings synchronise the device.
The timings are wall-clock; `cpu_share` (CPU time / (wall x threads)) and `other_load` (the share
of the machine other processes used meanwhile) say how much of the CPU the run really had.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from musetalk import accel
from musetalk.audio import WINDOW_SAMPLES, AudioFeatureEncoder, positional_encoding
from musetalk.avatar.store import Avatar, AvatarManifest, now_iso
from musetalk.config import AUDIO_SAMPLE_RATE, VIDEO_FPS
from musetalk.face.box import crop_box as make_crop_box
from musetalk.face.mask import blur_kernel_size
from musetalk.generate import LipSyncGenerator
from musetalk.latents import FACE_SIZE, VAE_SCALING_FACTOR, _to_uint8
from musetalk.models import MUSETALK_UNET_CONFIG, SD_VAE_CONFIG, WHISPER_TINY_CONFIG, Models

OFFICIAL_BATCH = 8
FRAMES_PER_WINDOW = WINDOW_SAMPLES * VIDEO_FPS // AUDIO_SAMPLE_RATE  # 750 video frames per 30 s window
FRAME_SIZE = (1280, 720)  # (width, height)
FACE_BOX = (515, 210, 765, 510)  # 250 x 300, a typical face in a 720p talking-head video

# Every number the JSON report carries; all are > 0 except the two difference counts.
FIGURE_KEYS = (
    "features_ms_per_window", "features_ms_per_frame",
    "unet_ms_per_frame", "vae_decode_ms_per_frame", "blend_ms_per_frame",
    "official_unet_ms_per_frame", "official_vae_decode_ms_per_frame", "official_blend_ms_per_frame",
    "ours_fps", "official_fps", "speedup",
    "max_abs_diff", "differing_pixels",
    "gflop_per_frame_features", "gflop_per_frame_unet", "gflop_per_frame_vae_decode", "gflop_per_frame_total",
    "peak_matmul_gflops",
    "features_gflops", "unet_gflops", "vae_decode_gflops", "ours_gflops", "official_gflops",
    "features_pct_of_peak", "unet_pct_of_peak", "vae_decode_pct_of_peak", "ours_pct_of_peak", "official_pct_of_peak",
    "cpu_share_ours", "cpu_share_official",
)  # fmt: skip
APPROX_KEYS = (
    "approx_fps",
    "approx_speedup",
    "approx_vae_decode_ms_per_frame",
    "approx_face_psnr_db",
    "approx_frame_psnr_db",
)


# ====================================================================== random models
def _plain(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def model_configs(tiny: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(UNet, VAE, whisper) configs: the published ones, or scaled-down ones with the same structure."""
    unet, vae, whisper = _plain(MUSETALK_UNET_CONFIG), _plain(SD_VAE_CONFIG), dict(WHISPER_TINY_CONFIG)
    if tiny:
        unet.update(block_out_channels=[32, 64, 64, 64], layers_per_block=1, norm_num_groups=8, cross_attention_dim=64)
        vae.update(block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8)
        whisper.update(d_model=64, encoder_attention_heads=2, encoder_ffn_dim=128, decoder_layers=1,
                       decoder_attention_heads=2, decoder_ffn_dim=128, vocab_size=64, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)  # fmt: skip
    return unet, vae, whisper


def _build_meta(tiny: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    unet_cfg, vae_cfg, whisper_cfg = model_configs(tiny)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        whisper = WhisperEncoder(WhisperConfig(**whisper_cfg))
    return unet.eval(), vae.eval(), whisper.eval()


@torch.no_grad()
def _random_init(module: torch.nn.Module, seed: int, last_conv_gain: dict[str, float] | None = None) -> None:
    """Fast random weights with sane activations: uniform with variance 1/fan_in, norms at 1.

    Copies slices of one random pool instead of drawing 850M numbers (the pool offsets are
    random, so tensors differ); biases small. `last_conv_gain` scales named weights down
    (the decoder's output conv) so that decoded faces span the uint8 range without saturating.
    """
    device = next(module.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    chunk = 1 << 21
    pool = (torch.rand(2 * chunk, generator=gen) * 2 - 1).to(device)  # variance 1/3
    for name, p in module.named_parameters():
        flat = p.view(-1)
        if p.ndim >= 2:
            scale = math.sqrt(3.0 / p[0].numel()) * (last_conv_gain or {}).get(name, 1.0)
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
            continue
        else:
            scale = 0.02 * math.sqrt(3.0)
        for start in range(0, flat.numel(), chunk):
            n = min(chunk, flat.numel() - start)
            offset = int(torch.randint(0, chunk, (1,), generator=gen))
            flat[start : start + n].copy_(pool[offset : offset + n]).mul_(scale)
    for _, b in module.named_buffers():
        b.zero_()


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers warns on every `.to(dtype)` of a model not loaded with `torch_dtype`; not useful here."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def build_random_models(
    *, tiny: bool = False, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int = 0
) -> Models:
    """Full-size (or tiny) MuseTalk networks with random weights, built on meta then materialised."""
    from transformers import WhisperFeatureExtractor

    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    unet, vae, whisper = _build_meta(tiny)
    modules = []
    for i, (m, gain) in enumerate(((unet, None), (vae, {"decoder.conv_out.weight": 0.3}), (whisper, None))):
        m = m.to_empty(device=device)
        _random_init(m, seed + i, gain)
        if dtype != torch.float32:
            with _quiet_diffusers():
                m = m.to(dtype)
        modules.append(m.eval().requires_grad_(False))
    unet, vae, whisper = modules
    return Models(
        unet=unet, vae=vae, whisper=whisper, feature_extractor=WhisperFeatureExtractor(feature_size=80),
        landmarker=None, face_parser=None, device=device, dtype=dtype,  # type: ignore[arg-type]
    )  # fmt: skip


# ====================================================================== synthetic avatar
def synthetic_avatar(
    *, frames: int = 8, size: tuple[int, int] = FRAME_SIZE, face_box: Sequence[int] = FACE_BOX, seed: int = 0
) -> Avatar:
    """A prepared-avatar stand-in: smooth random 720p frames, a jittered ~250x300 face box, the
    MuseTalk crop box around it, a blurred lower-face mask at crop size, random latents."""
    rng = np.random.default_rng(seed)
    width, height = size
    frame_list, masks, boxes, crops = [], [], [], []
    for _ in range(frames):
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        frame = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
        frame = cv2.add(frame, rng.integers(0, 8, frame.shape, dtype=np.uint8))  # sensor noise
        dx, dy = (int(v) for v in rng.integers(-6, 7, 2))
        x0, y0, x1, y1 = (int(face_box[0]) + dx, int(face_box[1]) + dy, int(face_box[2]) + dx, int(face_box[3]) + dy)
        cb = make_crop_box((x0, y0, x1, y1), (width, height))
        cw, ch = cb[2] - cb[0], cb[3] - cb[1]
        mask = np.zeros((ch, cw), np.uint8)
        fx0, fy0, fx1, fy1 = x0 - cb[0], y0 - cb[1], x1 - cb[0], y1 - cb[1]
        centre = ((fx0 + fx1) // 2, (fy0 + fy1) // 2)
        cv2.ellipse(
            mask, (centre[0], (fy0 + 3 * fy1) // 4), ((fx1 - fx0) * 9 // 20, (fy1 - fy0) * 3 // 8), 0, 0, 360, 255, -1
        )
        mask[: centre[1]] = 0  # only below the box centre line, as MuseTalk's v1.5 mask
        k = blur_kernel_size(cw)
        mask = cv2.GaussianBlur(mask, (k, k), 0)
        frame_list.append(frame)
        masks.append(mask)
        boxes.append((x0, y0, x1, y1))
        crops.append(cb)
    latents = torch.from_numpy(rng.standard_normal((frames, 8, 32, 32), dtype=np.float32))
    manifest = AvatarManifest(
        name="bench", fps=VIDEO_FPS, frame_count=frames, frame_size=(width, height), source_video="synthetic",
        preparation={"synthetic": True}, created=now_iso(),
    )  # fmt: skip
    return Avatar(manifest, frame_list, masks, np.asarray(boxes, np.int32), np.asarray(crops, np.int32), latents)


def synthetic_features(frames: int, dim: int, *, seed: int = 0) -> torch.Tensor:
    """Random per-frame audio windows `(frames, 50, dim) float32` in the range of whisper states."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(frames, 50, dim, generator=gen)


# ====================================================================== official loop
def official_blend(
    frame: np.ndarray, face: np.ndarray, box: Sequence[int], crop_box: Sequence[int], mask: np.ndarray
) -> np.ndarray:
    """MuseTalk's full-frame PIL composite. `face` is already resized to the box.

    Body image of the whole frame; its crop-box crop gets the face pasted at the box; that crop
    is pasted back through the mask. (MuseTalk flips BGR<->RGB around this; every step works per
    channel, so RGB in gives the same bytes.)
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    cb = tuple(int(v) for v in crop_box)
    body = Image.fromarray(frame)
    face_large = body.crop(cb)
    face_large.paste(Image.fromarray(face), (x0 - cb[0], y0 - cb[1], x1 - cb[0], y1 - cb[1]))
    body.paste(face_large, cb[:2], Image.fromarray(mask).convert("L"))
    return np.array(body)


def official_decode(vae, latents: torch.Tensor) -> np.ndarray:
    """MuseTalk's `decode_latents` (RGB kept): `(B, 4, 32, 32)` -> `(B, 256, 256, 3) uint8` numpy."""
    latents = (1 / VAE_SCALING_FACTOR) * latents
    image = vae.decode(latents.to(vae.dtype)).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    image = image.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    return (image * 255).round().astype(np.uint8)


def official_loop(
    models: Models,
    avatar: Avatar,
    features: torch.Tensor,
    *,
    batch_size: int = OFFICIAL_BATCH,
    start_position: int = 0,
    timer: StageTimer | None = None,
) -> list[np.ndarray]:
    """The reference: MuseTalk's real-time loop, one batch after another, nothing overlapped.

    Per batch: the avatar's latents for these loop positions, audio windows + positional
    encoding, one UNet step at t=0, the VAE decode, then per frame `cv2.resize` of the face to
    its box and the full-frame PIL blend.
    """
    device, dtype = models.device, models.dtype
    pe = positional_encoding(50, models.audio_dim).to(device, dtype)
    timesteps = torch.tensor([0], device=device)
    timer = timer or StageTimer(device, enabled=False)
    out: list[np.ndarray] = []
    total = features.shape[0]
    for start in range(0, total, batch_size):
        idx = [avatar.frame_index(start_position + k) for k in range(start, min(start + batch_size, total))]
        with torch.no_grad():
            latent_batch = torch.cat([avatar.latents[i : i + 1] for i in idx]).to(device=device, dtype=dtype)
            audio = features[start : start + len(idx)].to(device, dtype) + pe
            pred = models.unet(latent_batch, timesteps, encoder_hidden_states=audio).sample
            faces = official_decode(models.vae, pred)
        with timer.cpu_stage("blend"):
            for i, face in zip(idx, faces):
                x0, y0, x1, y1 = (int(v) for v in avatar.boxes[i])
                resized = cv2.resize(face, (x1 - x0, y1 - y0))
                out.append(
                    official_blend(avatar.frames[i], resized, avatar.boxes[i], avatar.crop_boxes[i], avatar.masks[i])
                )
    return out


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

    unet, vae, whisper = _build_meta(tiny)
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


# ====================================================================== the run
@dataclass
class BenchOptions:
    device: str = "auto"
    batch: int = OFFICIAL_BATCH
    frames: int = 16
    tiny: bool = False
    approx: bool = False
    accel: bool = True
    keep_memory: bool = True
    lean_blocks: bool = False
    channels_last: bool = False
    compile: bool = False
    warmup: bool = True
    repeats: int = 1
    threads: int | None = None
    seed: int = 0


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: PyTorch sees no CUDA GPU")
    return device


def _ours_models(models: Models, opts: BenchOptions, *, approx: bool = False) -> Models:
    if not opts.accel and not approx:
        return accel.optimize_for_inference(models, keep_memory=False, lean_blocks=False, copy_modules=True)
    return accel.optimize_for_inference(
        models,
        keep_memory=opts.keep_memory and models.device.type == "cpu",
        lean_blocks=opts.lean_blocks,
        channels_last=opts.channels_last,
        approx_decode=approx,
        compile=opts.compile,
        copy_modules=True,
    )


def run(opts: BenchOptions, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the whole benchmark and return the report (the `--json` object)."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = _resolve_device(opts.device)
    t_build = time.perf_counter()
    models = build_random_models(tiny=opts.tiny, device=device, seed=opts.seed)
    log(
        f"built {'tiny' if opts.tiny else 'full-size'} random models on {models.describe()} in {time.perf_counter() - t_build:.1f} s"
    )
    avatar = synthetic_avatar(seed=opts.seed)
    features = synthetic_features(opts.frames, models.audio_dim, seed=opts.seed + 1)
    flops = count_gflop(opts.tiny)
    peak_n = 1024 if opts.tiny and device.type == "cpu" else None
    peak, peak_how = peak_matmul_gflops(device, n=peak_n)
    log(f"peak matmul {peak:.0f} GFLOP/s ({peak_how})")

    # Features: one 30 s window through the feature extractor + whisper encoder.
    encoder = AudioFeatureEncoder(models.whisper, models.feature_extractor, device, models.dtype)
    audio = (np.random.default_rng(opts.seed).standard_normal(WINDOW_SAMPLES) * 0.1).astype(np.float32)
    encoder.encode_window(audio[:AUDIO_SAMPLE_RATE])  # warm-up
    feat = min((timed(lambda: encoder.encode_window(audio), device) for _ in range(3)), key=lambda t: t.wall)

    ours_models = _ours_models(models, opts)
    ours_timer, official_timer = StageTimer(device), StageTimer(device)
    ours_timer.hook("unet", ours_models.unet)
    ours_timer.hook("vae_decode", ours_models.vae.post_quant_conv, ours_models.vae.decoder)
    official_timer.hook("unet", models.unet)
    official_timer.hook("vae_decode", models.vae.post_quant_conv, models.vae.decoder)
    generator = LipSyncGenerator(ours_models, avatar, batch_size=opts.batch)
    plain_compose = generator.compose

    def timed_compose(position: int, face: np.ndarray) -> np.ndarray:
        with ours_timer.cpu_stage("blend"):
            return plain_compose(position, face)

    generator.compose = timed_compose  # type: ignore[method-assign]
    keep = opts.accel and opts.keep_memory and device.type == "cpu"
    exact_faces = _capture_first_output(ours_models.vae.decoder) if opts.approx else None

    def run_official(feats: torch.Tensor, timer: StageTimer | None) -> list[np.ndarray]:
        accel.keep_freed_memory(False)
        return official_loop(models, avatar, feats, batch_size=OFFICIAL_BATCH, timer=timer)

    def run_ours(feats: torch.Tensor) -> list[np.ndarray]:
        if keep:
            accel.keep_freed_memory(True)
        return list(generator.generate(feats))

    try:
        if opts.warmup:
            n = min(opts.frames, max(opts.batch, OFFICIAL_BATCH))
            ours_timer.enabled = official_timer.enabled = False
            run_official(features[:n], None)
            run_ours(features[:n])
            ours_timer.enabled = official_timer.enabled = True
            log(f"warm-up done ({n} frames each)")
        official_runs, ours_runs = [], []
        for _ in range(max(1, opts.repeats)):
            for name, runs, timer, fn in (
                ("official loop", official_runs, official_timer, lambda: run_official(features, official_timer)),
                ("ours", ours_runs, ours_timer, lambda: run_ours(features)),
            ):
                timer.seconds.clear()
                runs.append(timed(fn, device))
                runs[-1].stages = timer.totals()  # each pass keeps its own stage times
                t = runs[-1]
                other = "" if t.other_load is None else f", others {100 * t.other_load:.0f}%"
                log(f"{name + ':':<14} {opts.frames / t.wall:.3f} fps (cpu share {t.cpu_share:.2f}{other})")
    finally:
        generator.close()
        if exact_faces is not None:
            exact_faces.remove()
    # The peak again after the passes: the best of both counts (a busy moment lowers one of them).
    peak = max(peak, peak_matmul_gflops(device, n=peak_n)[0])
    official = min(official_runs, key=lambda t: t.wall)
    ours = min(ours_runs, key=lambda t: t.wall)
    identical, max_diff, differing = compare_frames(ours.result, official.result)
    st_ours, st_off = ours.stages, official.stages
    ours_timer.remove()
    official_timer.remove()

    f = opts.frames
    gf_feat = flops["features_window"] / FRAMES_PER_WINDOW
    gf_total = flops["unet"] + flops["vae_decode"] + gf_feat
    ms = lambda s: 1000 * s / f  # noqa: E731
    rep: dict[str, Any] = {
        "config": {
            "device": str(device), "device_name": _device_name(device), "dtype": str(models.dtype).removeprefix("torch."),
            "tiny": opts.tiny, "representative": not opts.tiny, "batch": opts.batch, "official_batch": OFFICIAL_BATCH,
            "frames": f, "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": max(1, opts.repeats),
            "warmup": opts.warmup, "frame_size": list(FRAME_SIZE), "face_box": [int(v) for v in avatar.boxes[0]],
            "crop_box": [int(v) for v in avatar.crop_boxes[0]], "face_size": FACE_SIZE,
            "accel": {"enabled": opts.accel, "keep_memory": keep and accel.allocator_tunable(),
                      "lean_blocks": opts.accel and opts.lean_blocks, "channels_last": opts.accel and opts.channels_last,
                      "compile": opts.accel and opts.compile},
            "peak_matmul": peak_how, "features_frames_per_window": FRAMES_PER_WINDOW,
            "timing": "wall clock; per path the best of its repeats, with that pass's stage times",
        },
        "features_ms_per_window": 1000 * feat.wall,
        "features_ms_per_frame": 1000 * feat.wall / FRAMES_PER_WINDOW,
        "unet_ms_per_frame": ms(st_ours.get("unet", 0.0)),
        "vae_decode_ms_per_frame": ms(st_ours.get("vae_decode", 0.0)),
        "blend_ms_per_frame": ms(st_ours.get("blend", 0.0)),
        "official_unet_ms_per_frame": ms(st_off.get("unet", 0.0)),
        "official_vae_decode_ms_per_frame": ms(st_off.get("vae_decode", 0.0)),
        "official_blend_ms_per_frame": ms(st_off.get("blend", 0.0)),
        "ours_fps": f / ours.wall,
        "official_fps": f / official.wall,
        "speedup": official.wall / ours.wall,
        "byte_identical": identical,
        "max_abs_diff": max_diff,
        "differing_pixels": differing,
        "gflop_per_frame_features": gf_feat,
        "gflop_per_frame_unet": flops["unet"],
        "gflop_per_frame_vae_decode": flops["vae_decode"],
        "gflop_per_frame_total": gf_total,
        "gflop_per_window_features": flops["features_window"],
        "peak_matmul_gflops": peak,
        "cpu_share_ours": ours.cpu_share,
        "cpu_share_official": official.cpu_share,
        "other_load": _max_or_none([ours.other_load, official.other_load]),
    }  # fmt: skip
    rep["features_gflops"] = flops["features_window"] / feat.wall
    rep["unet_gflops"] = _rate(flops["unet"], rep["unet_ms_per_frame"])
    rep["vae_decode_gflops"] = _rate(flops["vae_decode"], rep["vae_decode_ms_per_frame"])
    rep["ours_gflops"] = gf_total * rep["ours_fps"]
    rep["official_gflops"] = gf_total * rep["official_fps"]
    for stage in ("features", "unet", "vae_decode", "ours", "official"):
        rep[f"{stage}_pct_of_peak"] = 100 * rep[f"{stage}_gflops"] / peak

    if opts.approx:
        rep.update(_run_approx(models, avatar, features, opts, ours, exact_faces.output, device, log))
    return rep


def _run_approx(
    models, avatar, features, opts: BenchOptions, exact: Timed, exact_faces: torch.Tensor, device, log
) -> dict[str, Any]:
    """The opt-in approximate decode: end-to-end speed, and PSNR against the exact path.

    The UNet path is unchanged, so the decoder sees the same latents in both passes: the
    first batch's decoded faces are compared directly, and so are the final blended frames.
    """
    approx_models = _ours_models(models, opts, approx=True)
    timer = StageTimer(device)
    timer.hook("vae_decode", approx_models.vae.post_quant_conv, approx_models.vae.decoder)
    faces = _capture_first_output(approx_models.vae.decoder)
    generator = LipSyncGenerator(approx_models, avatar, batch_size=opts.batch)
    keep = opts.keep_memory and device.type == "cpu"
    try:
        if keep:
            accel.keep_freed_memory(True)
        if opts.warmup:
            timer.enabled = False
            list(generator.generate(features[: min(opts.frames, opts.batch)]))
            timer.enabled = True
        run = timed(lambda: list(generator.generate(features)), device)
    finally:
        generator.close()
        faces.remove()
    stage = timer.totals()
    timer.remove()
    face_psnr = psnr(_to_uint8(faces.output).cpu().numpy(), _to_uint8(exact_faces).cpu().numpy())
    frame_psnr = psnr(np.stack(run.result), np.stack(exact.result))
    out = {
        "approx_fps": opts.frames / run.wall,
        "approx_speedup": exact.wall / run.wall,
        "approx_vae_decode_ms_per_frame": 1000 * stage.get("vae_decode", 0.0) / opts.frames,
        "approx_face_psnr_db": face_psnr,
        "approx_frame_psnr_db": frame_psnr,
        "approx_method": _approx_method(device),
    }
    log(f"approx: {out['approx_fps']:.3f} fps, face PSNR {face_psnr} dB")
    return out


class _capture_first_output:
    """Keeps the first forward output of a module (the first batch's decoded faces)."""

    def __init__(self, module: torch.nn.Module):
        self.output: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if self.output is None:
            self.output = output.detach().float().clone()

    def remove(self) -> None:
        self._handle.remove()


def _approx_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "VAE decoder with channels_last weights (fp16)"
    if accel.bf16_cpu_supported():
        return "VAE decoder under bf16 autocast (native bf16 CPU)"
    return "none: this CPU has no native bf16, the decoder stays fp32 (identical to exact)"


def _rate(gflop: float, ms_per_frame: float) -> float:
    return gflop / (ms_per_frame / 1000) if ms_per_frame > 0 else 0.0


def _max_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _device_name(device: torch.device) -> str:
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


# ====================================================================== text report
def format_report(rep: dict[str, Any]) -> str:
    c = rep["config"]
    lines = []
    if c["tiny"]:
        lines.append("*** --tiny: tiny architectures, figures are NOT representative of MuseTalk ***")
    lines += [
        f"MuseTalk v1.5 generation bench: {c['device_name']}, {c['dtype']}, {c['threads']} threads, torch {c['torch']}",
        f"{c['frames']} frames, our batch {c['batch']}, official batch {c['official_batch']}, "
        f"{c['frame_size'][0]}x{c['frame_size'][1]} frames, face box {c['face_box']}, crop box {c['crop_box']}",
        f"accel: {c['accel']}",
        "",
        f"{'stage':<12}{'ours ms/frame':>15}{'official':>12}{'GFLOP/frame':>13}{'GFLOP/s':>10}{'% of peak':>11}",
        f"{'features':<12}{rep['features_ms_per_frame']:>15.2f}{'':>12}{rep['gflop_per_frame_features']:>13.3f}"
        f"{rep['features_gflops']:>10.1f}{rep['features_pct_of_peak']:>10.1f}%",
        f"{'UNet':<12}{rep['unet_ms_per_frame']:>15.1f}{rep['official_unet_ms_per_frame']:>12.1f}"
        f"{rep['gflop_per_frame_unet']:>13.1f}{rep['unet_gflops']:>10.1f}{rep['unet_pct_of_peak']:>10.1f}%",
        f"{'VAE decode':<12}{rep['vae_decode_ms_per_frame']:>15.1f}{rep['official_vae_decode_ms_per_frame']:>12.1f}"
        f"{rep['gflop_per_frame_vae_decode']:>13.1f}{rep['vae_decode_gflops']:>10.1f}{rep['vae_decode_pct_of_peak']:>10.1f}%",
        f"{'blend':<12}{rep['blend_ms_per_frame']:>15.2f}{rep['official_blend_ms_per_frame']:>12.2f}"
        f"{'(crop only, in a worker thread)':>45}",
        f"features: {rep['features_ms_per_window']:.0f} ms per 30 s window (log-mel + encoder, "
        f"{rep['gflop_per_window_features']:.1f} GFLOP), amortised over its {c['features_frames_per_window']} frames at 25 fps",
        f"peak: {rep['peak_matmul_gflops']:.0f} GFLOP/s ({c['peak_matmul']}, best before/after the passes); "
        f"total {rep['gflop_per_frame_total']:.1f} GFLOP/frame",
        "",
        f"end to end: ours {rep['ours_fps']:.3f} fps ({rep['ours_gflops']:.0f} GFLOP/s, {rep['ours_pct_of_peak']:.0f}% of peak), "
        f"official loop {rep['official_fps']:.3f} fps ({rep['official_pct_of_peak']:.0f}% of peak)",
        f"ours / official: {rep['speedup']:.3f}x",
        f"byte-identical to the official loop: {'YES' if rep['byte_identical'] else 'NO'} "
        f"(max abs diff {rep['max_abs_diff']}, {rep['differing_pixels']} values differ)",
        f"cpu share: ours {rep['cpu_share_ours']:.2f}, official {rep['cpu_share_official']:.2f}"
        + (
            f"; other processes used {100 * rep['other_load']:.0f}% of the machine meanwhile"
            if rep.get("other_load") is not None
            else ""
        ),
    ]
    if rep.get("other_load") and rep["other_load"] > 0.1:
        lines.append("WARNING: other processes were busy during the run; timings are disturbed")
    if "approx_fps" in rep:
        fp = rep["approx_face_psnr_db"]
        fr = rep["approx_frame_psnr_db"]
        lines += [
            "",
            f"--approx ({rep['approx_method']}): {rep['approx_fps']:.3f} fps ({rep['approx_speedup']:.2f}x the exact path), "
            f"VAE decode {rep['approx_vae_decode_ms_per_frame']:.1f} ms/frame",
            f"  PSNR vs exact on the same latents: faces {'inf' if fp is None else f'{fp:.1f}'} dB, "
            f"blended frames {'inf' if fr is None else f'{fr:.1f}'} dB",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m musetalk.bench", description=__doc__.split("\n\n")[0])
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
    live = p.add_argument_group("live streams (musetalk.bench_streams)")
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
    if streams is not None or live_args["find_max"]:
        return _main_streams(streams or "64", live_args, args)
    as_json = args.pop("json")
    if args["frames"] < 1 or args["batch"] < 1:
        p.error("--frames and --batch must be >= 1")
    opts = BenchOptions(**args)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if as_json else (lambda s: print(s, flush=True))
    rep = run(opts, log)
    print(json.dumps(rep, indent=2) if as_json else "\n" + format_report(rep))
    return 0


def _main_streams(streams: str, live: dict[str, Any], args: dict[str, Any]) -> int:
    """`--streams`: paced live sessions against the generation service (see musetalk.bench_streams)."""
    from musetalk.bench_streams import StreamsOptions, main_streams

    device = _resolve_device(args["device"])
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
    avatars = []
    for k in range(opts.avatars):
        avatar = synthetic_avatar(frames=10, size=opts.frame_size, face_box=(150, 140, 362, 400), seed=args["seed"] + k)
        avatars.append(dataclasses.replace(avatar, manifest=dataclasses.replace(avatar.manifest, name=f"bench{k}")))
    print(f"{size} random models on {_device_name(device)} ({models.describe()}), {torch.get_num_threads()} torch threads, "
          f"{opts.seconds:.0f} s of speech per session, latency budget {opts.latency_budget_s} s", flush=True)  # fmt: skip
    if live["backend"] != "inproc":
        from musetalk.serve.bench import main_streams_ray_cli

        return main_streams_ray_cli(
            live["backend"], models, avatars, counts, opts, live["replicas"], size, args["seed"]
        )
    main_streams(models, avatars, counts, opts, find=live["find_max"], baseline=live["baseline"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
