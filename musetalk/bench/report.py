"""The generation benchmark's text report (the `--json` object, formatted for people), and JSON-safe values."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """For strict JSON (`allow_nan=False`): non-finite floats become null, paths and tuples plain."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


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
