"""`report.md`: the device report's JSON object written out for people (tables, and why anything is missing)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

from musetalk.bench.streams import HEADER, StreamsResult, format_row


def _n(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_n(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]


def _device(d: dict[str, Any]) -> list[str]:
    memory = "GPU memory" if d["device"].startswith("cuda") else "host memory"
    packages = ", ".join(f"{k} {v}" for k, v in d["packages"].items() if v)
    rows = [
        ["device", f"{d['name']} ({d['device']})"], [memory, f"{_n(d.get('memory_mb'), 0)} MB"],
        ["dtype of the fast path", d["dtype"]], ["torch / CUDA / cuDNN", f"{d['torch']} / {_n(d['cuda'])} / {_n(d['cudnn'])}"],
        ["python, CPUs, torch threads", f"{d['python']}, {d['cpus']}, {d['torch_threads']}"],
        ["models", f"{d['size']} architectures, random weights, built in {d['build']['seconds']:.1f} s"],
        ["packages", packages],
    ]  # fmt: skip
    return _table(["", ""], rows)


def _generation(d: dict[str, Any]) -> list[str]:
    ref = d["reference"]
    lines = [
        f"Fast path: {d['fast_path']}, blending overlapped with the next batch; {d['threads']} torch threads. "
        f"Exactness: the largest difference of a uint8 value of a whole frame from the fp32 reference "
        f"({ref['path']}, first {ref['frames']} frames; 0 = byte-identical).",
        "",
    ]
    rows = []
    for r in d["batches"]:
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']} ({r['compared']} frames)"
        rows.append([r["batch"], _n(r["fps"], 2), _n(r["unet_ms"]), _n(r["vae_decode_ms"]), _n(r["blend_ms"]), diff,
                     _n(r["differing_pct"], 3), _n(r["gpu_peak_mb"], 0), r["status"] + (f": {r['reason']}" if r["reason"] else "")])  # fmt: skip
    header = ["batch", "frames/s", "UNet ms/frame", "VAE decode ms/frame", "blend ms/frame", "max abs diff vs fp32",
              "values differing %", "GPU peak MB", "status"]  # fmt: skip
    return lines + _table(header, rows)


def _stages(d: dict[str, Any]) -> list[str]:
    f, enc, ms = d["features"], d["video_encode"], d["ms_per_frame"]
    names = {"audio_features": "audio features (whisper, file path)", "unet": "UNet", "vae_decode": "VAE decode",
             "blend": "blend / paste", "video_encode": "video encode"}  # fmt: skip
    rows = [[names[k], _n(v, 2)] for k, v in ms.items()] + [["**sum**", _n(d["total_ms_per_frame"], 2)]]
    return _table(["stage", "ms per frame"], rows) + [
        "",
        f"UNet, VAE decode and blend at batch {_n(d['batch'])} (generation section; end to end "
        f"{_n(d['generation_fps'], 2)} frames/s, the stages overlapping). Audio features: one 30 s window takes "
        f"{_n(f['window_ms'])} ms, amortised over its 750 frames on the file path; the live service encodes one "
        f"window per session and batch, {_n(f['live_ms_per_window_batched'])} ms per window in a pass of "
        f"{f['live_batch']}. Video encode: {enc['encoder']}, {enc['frames']} frames of {enc['size'][0]}x{enc['size'][1]}.",
    ]


def _mouth(d: dict[str, Any]) -> list[str]:
    p = d["pacing"]
    rows = [["p50", _n(d["p50_ms"], 0)], ["p95", _n(d["p95_ms"], 0)], ["min / max", f"{_n(d['min_ms'], 0)} / {_n(d['max_ms'], 0)}"],
            ["utterances with a moving mouth", f"{d['with_mouth']} of {d['utterances']}"]]  # fmt: skip
    return _table(["first TTS audio -> first mouth", "ms"], rows) + [
        "",
        f"One speech-mode session on the shared service (batch {d['service_batch']}, {_n(d['frame_cost_ms'])} ms per "
        f"frame), latency budget {d['latency_budget_s']} s (the default); {p['utterance_s']} s utterances streamed in "
        f"{p['chunk_s']} s chunks at {p['speed']}x real time, {p['gap_s']} s apart; one warm-up utterance not counted.",
    ]


def _memory(d: dict[str, Any]) -> list[str]:
    m = d["models"]
    params = ", ".join(f"{k} {v:.0f} MB" for k, v in m["parameters_mb"].items())
    added = (
        f"{_n(m['rss_mb'], 0)} MB of process RSS" if m["gpu_mb"] is None else f"{_n(m['gpu_mb'], 0)} MB of GPU memory"
    )
    lines = [
        f"Models: parameters {params} (total {sum(m['parameters_mb'].values()):.0f} MB); building them added {added}.",
        "",
    ]
    rows = [
        [s["sessions"], s["services"], _n(s["gpu_mb"], 0), _n(s["gpu_peak_mb"], 0), _n(s["rss_mb"], 0)]
        for s in d["steps"]
    ]
    if rows:
        lines += _table(["sessions", "services", "GPU allocated MB", "GPU peak MB", "RSS MB"], rows) + [""]
    for label, per in d["per_extra_session"].items():
        if per:
            lines.append(f"- each extra session, {label.replace('_', ' ')}: GPU {_n(per['gpu_mb'])} MB allocated, "
                         f"{_n(per['gpu_peak_mb'])} MB peak; RSS {_n(per['rss_mb'])} MB")  # fmt: skip
    return lines


def _served(s: dict[str, Any]) -> str:
    n = s["largest_n"]
    if not s["runs"]:
        return f"not measured ({s['stopped']})"
    if not s["complete"]:
        return f"at least {n} sessions served (the budget stopped the search)" if n else "none served in the runs made"
    return f"at least {n} sessions served (the search's limit)" if s["at_limit"] else f"{n} sessions served"


def _sessions(d: dict[str, Any]) -> list[str]:
    lines = [f"- {label.replace('_', ' ')}: {_served(d[label])}" for label in ("shared_service", "service_per_session")]
    lines += ["", f"Served: {d['criterion']}."]
    lines += ["", f"Runs: {d['seconds_per_run']} s of speech per session, latency budget {d['latency_budget_s']} s, "
              f"{d['frame_size'][0]}x{d['frame_size'][1]} avatars; p50 / p95 = a frame's last audio sample -> its image.", "",
              HEADER, "|" + "---|" * 10]  # fmt: skip
    names = {f.name for f in fields(StreamsResult)}
    for label in ("shared_service", "service_per_session"):
        lines += [format_row(StreamsResult(**{k: v for k, v in r.items() if k in names})) for r in d[label]["runs"]]
    return lines


def _speedups(d: dict[str, Any]) -> list[str]:
    lines = [f"Added by this report: {d['added']}.", ""]
    if "default_fps" in d:
        lines.append(f"Default fast path at batch {d['batch']}: {d['default_fps']:.2f} frames/s.")
        lines.append("")
    rows = [[v["name"], _n(v.get("fps"), 2), _n(v.get("speedup"), 3), _n(v.get("max_abs_diff")),
             v.get("verdict") or f"{v['status']}: {v.get('reason')}"] for v in d["variants"]]  # fmt: skip
    return lines + _table(["opt-in", "frames/s", "vs default", "max abs diff vs default", "verdict"], rows)


RENDERERS: dict[str, tuple[str, Callable[[dict[str, Any]], list[str]]]] = {
    "device": ("Device", _device),
    "generation": ("Generation: frames/s by batch size", _generation),
    "stages": ("Cost per frame by stage", _stages),
    "first_mouth": ("First TTS audio -> first mouth frame", _mouth),
    "memory": ("Memory", _memory),
    "sessions": ("Sessions served at 25 fps", _sessions),
    "speedups": ("Optional speed-ups", _speedups),
}


def _header(report: dict[str, Any]) -> list[str]:
    s = report["settings"]
    device = report["sections"].get("device", {}).get("data", {})
    lines = [f"# MuseTalk device report: {device.get('name', s['device'])}", ""]
    if s["size"] == "tiny":
        lines += ["**Tiny test models: these figures are NOT representative of MuseTalk.**", ""]
    state = "complete" if report.get("complete") else "INCOMPLETE (stopped or still running)"
    lines += [f"{s['size']} random-weight models (speed and memory only: random weights draw no face), "
              f"{report['started']}, {_n(report.get('elapsed_s'), 0)} s of a {s['budget_s']:.0f} s budget, {state}.", ""]  # fmt: skip
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    lines = _header(report)
    for name, (title, render) in RENDERERS.items():
        section = report["sections"].get(name, {"status": "pending"})
        lines += [f"## {title}", ""]
        status = section["status"]
        if status in ("pending", "skipped", "failed"):
            lines += [f"*{status}*" + (f": {section['reason']}" if section.get("reason") else ""), ""]
            continue
        lines += render(section["data"]) + [""]
        if status == "partial":
            lines += ["Not measured (time or memory): " + "; ".join(section["data"]["skipped"]), ""]
        lines += [f"*{section['seconds']:.0f} s*", ""]
    return "\n".join(lines)
