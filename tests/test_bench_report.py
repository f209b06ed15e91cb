"""`python -m musetalk.bench report`: the device report runs end to end on tiny CPU models within its budget,
and every section is in report.json and report.md (measured, or marked skipped with the reason). No timing
assertions beyond the budget: the figures of tiny models on a shared CPU mean nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from musetalk.bench.budget import Budget, Deadline, OutOfTime
from musetalk.bench.device_report import SECTION_NAMES, write_atomic
from musetalk.bench.markdown import RENDERERS, render_markdown
from musetalk.bench.mouth import percentile

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 45


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "musetalk.bench", "report", "--size", "tiny", "--device", "cpu", "--out", str(out),
         "--budget-s", str(BUDGET_S), "--threads", "1", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=BUDGET_S + 120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout), out, time.monotonic() - start  # stdout is exactly one JSON object


@pytest.mark.slow  # a whole report, ~30 s on 2 cores
def test_tiny_report_has_every_section_within_its_budget(tiny_report):
    report, out, wall = tiny_report
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report and report["complete"] is True
    assert report["elapsed_s"] <= 1.5 * BUDGET_S, f"{report['elapsed_s']:.0f} s for a {BUDGET_S} s budget"
    print(f"\ntiny report: {report['elapsed_s']:.0f} s of a {BUDGET_S} s budget ({wall:.0f} s with the start), "
          + ", ".join(f"{k} {v['status']}" for k, v in report["sections"].items()))  # fmt: skip
    assert list(report["sections"]) == list(SECTION_NAMES)
    for name, section in report["sections"].items():
        assert section["status"] in ("ok", "partial", "skipped"), f"{name}: {section}"
        if section["status"] == "skipped":
            assert section["reason"], name
        if section["status"] == "partial":
            assert section["data"]["skipped"] and all(section["data"]["skipped"]), name
    sections = {k: v.get("data") for k, v in report["sections"].items()}
    assert sections["device"]["dtype"] == "float32" and sections["device"]["size"] == "tiny"
    first = sections["generation"]["batches"][0]  # the first batch is always measured
    assert first["batch"] == 1 and first["status"] == "ok" and first["fps"] > 0
    assert isinstance(first["max_abs_diff"], int) and first["compared"] > 0
    assert [b["batch"] for b in sections["generation"]["batches"]] == [1, 4, 8, 16, 32, 64]
    for b in sections["generation"]["batches"]:
        assert b["status"] == "ok" or b["reason"], b


@pytest.mark.slow  # a whole report, ~30 s on 2 cores
def test_tiny_report_figures_are_where_the_markdown_reads_them(tiny_report):
    report, out, _ = tiny_report
    s = {k: v.get("data") for k, v in report["sections"].items()}
    if s["stages"]:
        assert set(s["stages"]["ms_per_frame"]) >= {"audio_features", "video_encode"}
        assert s["stages"]["video_encode"]["ms_per_frame"] > 0
    if s["first_mouth"]:
        assert s["first_mouth"]["latency_budget_s"] == 0.2 and s["first_mouth"]["utterances"] >= 0
    if s["memory"]:
        assert s["memory"]["models"]["parameters_mb"]["unet"] > 0 and s["memory"]["steps"]
    if s["sessions"]:
        assert s["sessions"]["shared_service"]["runs"] or s["sessions"]["shared_service"]["stopped"]
    if s["speedups"]:
        assert s["speedups"]["added"].startswith("none")
    text = (out / "report.md").read_text()
    assert text == render_markdown(report)
    assert "NOT representative" in text and "complete." in text
    for title, _ in RENDERERS.values():
        assert f"## {title}" in text
    assert not list(out.glob(".*.tmp")), "a temp file was left behind"


def test_budget_shares_the_time_left_by_weight():
    now = [100.0]
    budget = Budget(60.0, {"a": 1.0, "b": 2.0, "c": 1.0}, clock=lambda: now[0])
    assert budget.section("a").left() == pytest.approx(15.0)
    now[0] += 5.0  # "a" used 5 of its 15 s: the rest goes to the later sections
    assert budget.section("b").left() == pytest.approx(55.0 * 2 / 3)
    now[0] += 60.0
    assert budget.left() == 0.0 and budget.section("c").left() == 0.0
    deadline = Deadline(now[0] + 10.0, clock=lambda: now[0])
    assert deadline.allows(9.0) and not deadline.allows(11.0)
    with pytest.raises(OutOfTime, match="N=8 needs ~11 s"):
        deadline.check(11.0, "N=8")


def test_markdown_says_why_a_section_is_missing():
    report = {
        "settings": {"size": "full", "device": "cuda", "budget_s": 480.0},
        "started": "2026-01-01T00:00:00+00:00",
        "elapsed_s": 480.0,
        "complete": False,
        "sections": {
            "device": {"status": "skipped", "reason": "budget used up (480 of 480 s)"},
            "generation": {"status": "failed", "reason": "RuntimeError: boom"},
        },
    }
    text = render_markdown(report)
    assert "*skipped*: budget used up" in text and "*failed*: RuntimeError: boom" in text
    assert "INCOMPLETE" in text and "*pending*" in text and "NOT representative" not in text


def test_atomic_write_replaces_the_whole_file(tmp_path):
    path = tmp_path / "report.md"
    write_atomic(path, "one")
    write_atomic(path, "two")
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_percentile_is_nearest_rank():
    assert percentile([], 95) is None
    assert percentile([3.0], 50) == 3.0
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 50) == 10.0 and percentile(values, 95) == 19.0 and percentile(values, 100) == 20.0
