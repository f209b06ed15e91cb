"""The generation benchmark: `python -m musetalk.bench [--device D] [--batch N] [--frames N] [--json] [--approx] [--tiny]`.

Full-size MuseTalk v1.5 architectures with random weights (no weight files needed) on a
synthetic 720p avatar. One run measures, in the same process and on the same inputs:

* our generator (`LipSyncGenerator.generate` on models passed through
  `accel.optimize_for_inference`) against an "official loop" written after MuseTalk's real-time
  script (`musetalk.bench.official`): UNet at batch 8, the full VAE decode with its numpy uint8 conversion,
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

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from musetalk import accel
from musetalk.audio import WINDOW_SAMPLES, AudioFeatureEncoder
from musetalk.avatar.store import Avatar
from musetalk.bench.official import OFFICIAL_BATCH, official_loop
from musetalk.bench.timing import (
    StageTimer,
    Timed,
    compare_frames,
    count_gflop,
    device_name,
    peak_matmul_gflops,
    psnr,
    timed,
)
from musetalk.config import AUDIO_SAMPLE_RATE, VIDEO_FPS
from musetalk.generate import LipSyncGenerator
from musetalk.latents import FACE_SIZE, _to_uint8
from musetalk.models import Models
from musetalk.testing import FRAME_SIZE, build_random_models, synthetic_avatar, synthetic_features

FRAMES_PER_WINDOW = WINDOW_SAMPLES * VIDEO_FPS // AUDIO_SAMPLE_RATE  # 750 video frames per 30 s window

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


def resolve_device(name: str) -> torch.device:
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
    device = resolve_device(opts.device)
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
    feat = _time_features(models, device, opts.seed)
    passes = _time_passes(models, avatar, features, opts, device, log)
    # The peak again after the passes: the best of both counts (a busy moment lowers one of them).
    peak = max(peak, peak_matmul_gflops(device, n=peak_n)[0])
    rep = _report(models, avatar, opts, device, passes, feat, flops, (peak, peak_how))
    if opts.approx:
        assert passes.exact_faces is not None
        rep.update(_run_approx(models, avatar, features, opts, passes.ours, passes.exact_faces.output, device, log))
    return rep


def _time_features(models: Models, device: torch.device, seed: int) -> Timed:
    """One 30 s window through the feature extractor + whisper encoder: the best of 3 after a warm-up."""
    encoder = AudioFeatureEncoder(models.whisper, models.feature_extractor, device, models.dtype)
    audio = (np.random.default_rng(seed).standard_normal(WINDOW_SAMPLES) * 0.1).astype(np.float32)
    encoder.encode_window(audio[:AUDIO_SAMPLE_RATE])  # warm-up
    return min((timed(lambda: encoder.encode_window(audio), device) for _ in range(3)), key=lambda t: t.wall)


@dataclass
class _Passes:
    """The best timed pass of each path (with its stage times and frames)."""

    official: Timed
    ours: Timed
    keep: bool  # our passes ran with `accel.keep_freed_memory`
    exact_faces: _capture_first_output | None  # with --approx: the first batch's exact decoded faces


def _time_passes(
    models: Models, avatar: Avatar, features: torch.Tensor, opts: BenchOptions, device: torch.device,
    log: Callable[[str], None],
) -> _Passes:  # fmt: skip
    """The official loop and our generator on the same inputs, alternating, `opts.repeats` times each."""
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
    ours_timer.remove()
    official_timer.remove()
    official = min(official_runs, key=lambda t: t.wall)
    ours = min(ours_runs, key=lambda t: t.wall)
    return _Passes(official=official, ours=ours, keep=keep, exact_faces=exact_faces)


def _report(
    models: Models, avatar: Avatar, opts: BenchOptions, device: torch.device, passes: _Passes, feat: Timed,
    flops: dict[str, float], peak_matmul: tuple[float, str],
) -> dict[str, Any]:  # fmt: skip
    """The `--json` object: configuration, per-stage times, speeds, exactness, GFLOP/s and share of peak."""
    ours, official, keep = passes.ours, passes.official, passes.keep
    peak, peak_how = peak_matmul
    identical, max_diff, differing = compare_frames(ours.result, official.result)
    st_ours, st_off = ours.stages, official.stages
    f = opts.frames
    gf_feat = flops["features_window"] / FRAMES_PER_WINDOW
    gf_total = flops["unet"] + flops["vae_decode"] + gf_feat
    ms = lambda s: 1000 * s / f  # noqa: E731
    rep: dict[str, Any] = {
        "config": {
            "device": str(device), "device_name": device_name(device), "dtype": str(models.dtype).removeprefix("torch."),
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
