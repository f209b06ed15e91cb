"""`python -m musetalk.bench`: runs end to end (tiny networks) and reports every figure. No timing assertions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from musetalk import accel
from musetalk.bench.report import format_report
from musetalk.bench.speed import APPROX_KEYS, FIGURE_KEYS, BenchOptions, run
from musetalk.bench.timing import count_gflop
from musetalk.testing import model_configs

REPO = Path(__file__).resolve().parent.parent
ZERO_WHEN_IDENTICAL = {"max_abs_diff", "differing_pixels"}


def _check_figures(report: dict, keys) -> None:
    missing = [k for k in keys if k not in report]
    assert not missing, f"missing figures: {missing}"
    for key in keys:
        value = report[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{key}={value!r}"
        assert math.isfinite(value), f"{key}={value!r}"
        if key in ZERO_WHEN_IDENTICAL:
            assert value == 0, f"{key}={value}: ours differs from the official loop"
        else:
            assert value > 0, f"{key}={value}"


@pytest.fixture(scope="module")
def tiny_report():
    proc = subprocess.run(
        [sys.executable, "-m", "musetalk.bench", "--tiny", "--frames", "4", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # stdout is exactly one JSON object (progress goes to stderr)


@pytest.mark.slow  # `python -m musetalk.bench --tiny` end to end
def test_tiny_json_has_every_figure_positive(tiny_report):
    _check_figures(tiny_report, FIGURE_KEYS)
    assert tiny_report["byte_identical"] is True
    cfg = tiny_report["config"]
    assert cfg["tiny"] is True and cfg["representative"] is False
    assert cfg["frames"] == 4 and cfg["batch"] == 8 and cfg["official_batch"] == 8
    assert cfg["features_frames_per_window"] == 750
    assert tiny_report["features_ms_per_frame"] == pytest.approx(tiny_report["features_ms_per_window"] / 750)
    assert tiny_report["speedup"] == pytest.approx(tiny_report["ours_fps"] / tiny_report["official_fps"])
    assert not any(k.startswith("approx_") for k in tiny_report)


@pytest.mark.slow
def test_text_report_says_tiny_is_not_representative(tiny_report):
    text = format_report(tiny_report)
    assert "NOT representative" in text
    assert "byte-identical to the official loop: YES" in text
    for stage in ("features", "UNet", "VAE decode", "blend"):
        assert stage in text


def test_approx_mode_reports_its_difference():
    try:
        report = run(BenchOptions(tiny=True, frames=2, batch=2, approx=True, warmup=False))
    finally:
        accel.keep_freed_memory(False)
    for key in APPROX_KEYS:
        assert key in report
    assert report["approx_fps"] > 0 and report["approx_vae_decode_ms_per_frame"] > 0
    if accel.bf16_cpu_supported():
        assert report["approx_face_psnr_db"] is not None and 25 < report["approx_face_psnr_db"] < 200
    assert "--approx" in format_report(report)
    json.dumps(report, allow_nan=False)  # valid strict JSON (an identical decode gives null, not inf)


def test_full_size_flop_counts_match_the_published_cost_table():
    flops = count_gflop(tiny=False)  # meta device: shapes only, nothing runs
    assert flops["unet"] == pytest.approx(178, rel=0.02)
    assert flops["vae_decode"] == pytest.approx(622, rel=0.02)
    assert flops["features_window"] == pytest.approx(37, rel=0.03)


def test_full_size_configs_are_the_published_ones():
    unet, vae, whisper = model_configs(tiny=False)
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 384
    assert vae["block_out_channels"] == [128, 256, 512, 512]
    assert whisper["d_model"] == 384 and whisper["encoder_layers"] == 4
