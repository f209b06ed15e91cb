"""`python -m musetalk.bench --streams`: the paced-session harness and the search (tiny models; no timing asserts)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from helpers import REPO, budget_for

from musetalk.bench.streams import HEADER, StreamsOptions, StreamsResult, find_max, format_row, main_streams
from musetalk.testing import synthetic_avatar


def result(n: int, fps: float, late: float) -> StreamsResult:
    return StreamsResult(n, True, fps * n, fps, fps, late, 100.0, 150.0, 20.0, 4.0, 500.0, None)


def test_find_max_doubles_then_bisects():
    measured = []

    def measure(n):
        measured.append(n)
        return result(n, 25.0 if n <= 5 else 20.0, 0.0)

    best, runs = find_max(measure, limit=64)
    assert best == 5 and measured == [1, 2, 4, 8, 6, 5] and len(runs) == 6
    assert find_max(lambda n: result(n, 25.0, 3.0))[0] == 0  # too many late frames: none qualifies


@pytest.mark.slow  # paced sessions, twice
def test_streams_report_rows_for_shared_and_per_session_services(models, frame_cost_s):
    avatars = []
    for k in range(2):
        a = synthetic_avatar(frames=3, size=(160, 160), face_box=(40, 40, 120, 130), seed=k)
        avatars.append(dataclasses.replace(a, manifest=dataclasses.replace(a.manifest, name=f"b{k}")))
    lines: list[str] = []
    # A budget in which this device makes the first batch (4 frames) of both streams: the mouth moves even here.
    opts = StreamsOptions(seconds=1.0, latency_budget_s=budget_for(2 * 4, frame_cost_s), frame_size=(160, 160))
    rows = main_streams(models, avatars, [2], opts, find=False, log=lines.append)
    assert [r.shared for r in rows] == [True, False] and all(r.streams == 2 for r in rows)
    for r in rows:
        assert r.generated_fps > 0 and 0.0 <= r.late_pct <= 100.0
        assert r.p50_ms is not None and 0 < r.p50_ms <= r.p95_ms
        assert r.peak_rss_mb > 0 and r.mean_batch is not None
    assert HEADER in lines and format_row(rows[0]) in lines
    assert any(line.startswith("offline render on the same models") for line in lines)
    assert any("gain of cross-session batching at N=2" in line for line in lines)
    assert format_row(rows[1]).count("|") == HEADER.count("|")


def test_streams_json_prints_one_json_object():
    """`--streams ... --json`: stdout is one JSON object (the table and progress go to stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "musetalk.bench", "--streams", "1", "--size", "tiny", "--seconds", "1",
         "--no-baseline", "--threads", "1", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["config"]["size"] == "tiny" and out["config"]["backend"] == "inproc"
    assert [(r["streams"], r["shared"]) for r in out["runs"]] == [(1, True)]
    assert {"generated_fps", "late_pct", "p95_ms", "good"} <= set(out["runs"][0])
    assert HEADER in proc.stderr  # the table still shows, on stderr


def test_ray_backend_json_prints_one_json_object(monkeypatch, capsys):
    """`--backend ray --json` (Ray itself stubbed: the point is what reaches stdout)."""
    import torch

    from musetalk import accel
    from musetalk.bench import __main__ as bench_main
    from musetalk.bench import streams

    def fake_ray(spec, models, avatars, counts, opts, replicas, size, seed, log=print):
        log(HEADER)  # what the real one prints goes through `log`
        return [result(n, 25.0, 0.0) for n in counts]

    monkeypatch.setattr(streams, "main_streams_ray_cli", fake_ray)
    threads = torch.get_num_threads()
    try:
        assert bench_main.main(["--streams", "1,2", "--backend", "ray", "--size", "tiny", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
        accel.keep_freed_memory(False)
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["config"]["backend"] == "ray" and [r["streams"] for r in out["runs"]] == [1, 2]
    assert HEADER in captured.err and HEADER not in captured.out
