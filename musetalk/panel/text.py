"""What the panel shows, as Markdown, HTML and table rows; no Gradio (tests read these directly)."""

from __future__ import annotations

import html
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from musetalk.avatar.store import FORMAT_VERSION, AvatarManifest
from musetalk.bot.transports import DEFAULT_PORT, page_url
from musetalk.config import FETCH_COMMAND, PrepareSettings
from musetalk.errors import MediaError
from musetalk.weights import format_bytes

if TYPE_CHECKING:
    from musetalk.panel.engine import Engine

MODE_HELP = {
    "mirror": "The avatar lip-syncs whoever speaks in the room or on the page (their voice is played back).",
    "say": "The avatar speaks what you type under **Speak** (with the bot config's TTS); **Stop speaking** "
    "stops it at once.",
    "conversation": "The avatar answers whoever speaks: speech-to-text, the LLM (with the system prompt and the "
    "conversation so far), then TTS. Speaking over it interrupts it. Set the services under **Speech services**.",
}
WEIGHT_COLUMNS = ("file", "part", "kind", "state", "size", "note")
OLDER_RULES = "made with older preprocessing rules — re-prepare for MuseTalk's exact crops/masks"
LANDMARKS_HELP = (
    "DWPose = MuseTalk's own landmark model (needs the optional file models/dwpose/dw-ll_ucoco_384.onnx); "
    "offline = the built-in face mesh; auto = DWPose when that file is there, else offline."
)
REPREPARE_HOW = (
    "Press **Load into the editor above** (its settings, with today's Max side and Landmarks), then "
    "**Re-prepare with the settings above**: it uses the kept source video."
)
PANEL_OFFLINE_HINT = "or set Landmarks to 'Offline face mesh' above and run it again"


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def prepare_settings(
    bbox_shift: float,
    extra_margin: float,
    parsing_mode: str,
    cheek_width: float,
    max_side: float | None = None,
    landmarks: str | None = None,
) -> PrepareSettings:
    """The editor's values as settings; an empty max_side or landmarks choice means the default."""
    defaults = PrepareSettings()
    return PrepareSettings(
        bbox_shift=int(bbox_shift),
        extra_margin=int(extra_margin),
        parsing_mode=parsing_mode,
        cheek_width=int(cheek_width),
        max_side=defaults.max_side if max_side is None else int(max_side),
        landmarks=landmarks or defaults.landmarks,
    )


def older_rules(manifest: dict[str, Any]) -> str | None:
    """Why an avatar should be prepared again (older format, or no landmark source recorded), else None."""
    if manifest.get("format_version", 0) < FORMAT_VERSION or "landmark_source" not in manifest.get("preparation", {}):
        return OLDER_RULES
    return None


def video_path(video: Any) -> Path:
    if isinstance(video, dict):  # a gr.Video payload passed through as a dict
        video = video.get("video") or video.get("path")
    if not video:
        raise MediaError("Upload a video of one person facing the camera first (a few seconds to a minute).")
    return Path(video)


def manifest_dict(manifest: AvatarManifest) -> dict[str, Any]:
    """A manifest as JSON-able data, plus whether its source video still exists."""
    data = asdict(manifest)
    data["frame_size"] = list(manifest.frame_size)
    data["seconds"] = round(manifest.frame_count / manifest.fps, 2) if manifest.fps else None
    data["source_exists"] = bool(manifest.source_video) and Path(manifest.source_video).is_file()
    data["landmark_source"] = manifest.preparation.get("landmark_source")
    data["older_rules"] = older_rules(data)
    return data


def manifest_markdown(m: dict[str, Any]) -> str:
    prep = m.get("preparation", {})
    width, height = m["frame_size"]
    rows = [
        ("Frames", f"{m['frame_count']} at {m['fps']} fps ({m['seconds']} s, played as a {m['cycle']} loop)"),
        ("Size", f"{width} × {height}"),
        ("bbox_shift", f"{prep.get('bbox_shift')} (range measured on this clip: {prep.get('bbox_shift_range')})"),
        ("extra_margin", prep.get("extra_margin")),
        (
            "Mask",
            f"{prep.get('parsing_mode')} asked, {prep.get('mask_mode_used')} used; cheek width {prep.get('cheek_width')}",
        ),
        ("Landmarks", m.get("landmark_source") or "not recorded (older rules)"),
        ("Max side", prep.get("max_side", "not recorded (older rules)")),
        ("Format", f"{m['format_version']} ({'older' if m.get('older_rules') else 'current'} rules)"),
        ("Frames without a face", len(prep.get("frames_without_face", [])) or "none"),
        ("Disk", format_bytes(m["disk_bytes"])),
        ("Created", m["created"]),
        (
            "Source video",
            f"`{m['source_video']}`" + ("" if m["source_exists"] else " (gone: re-prepare needs the video again)"),
        ),
        ("Prepared with", prep.get("models", "?")),
    ]
    text = f"#### {m['name']}\n\n"
    if m.get("older_rules"):
        text += f"**This avatar was {m['older_rules']}.** {REPREPARE_HOW}\n\n"
    text += "| Property | Value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if m.get("notes"):
        text += "\n\n" + "\n".join(f"- {note}" for note in m["notes"])
    return text


def delete_question(name: str, source: Path | None, *, damaged: bool = False) -> str:
    """The delete confirmation: what goes, including the kept copy of the source video."""
    if damaged:
        text = f"Delete the damaged avatar **{name}** for good? Its folder and everything in it are removed"
    else:
        text = f"Delete avatar **{name}** for good? Its frames, masks and latents are removed"
    if source is None:
        return text + "."
    return (
        text + f", **and so is the copy of its source video kept for re-preparing** (`{source}`): "
        "copy that file elsewhere first if you may want to prepare this avatar again."
    )


def damaged_markdown(entries: list[dict[str, Any]]) -> str:
    """Damaged avatars in the library: why, and what to do (delete, prepare again from the kept video)."""
    lines = [f"**{len(entries)} damaged avatar{'s' if len(entries) > 1 else ''}** (cannot be used):", ""]
    for d in entries:
        reason = d["reason"].strip()
        line = f"- `{d['name']}`: {html.escape(reason)}" + ("" if reason.endswith(".") else ".")
        if d.get("kept_source"):
            line += f" Its source video is kept at `{d['kept_source']}`."
        lines.append(line)
    lines.append("\nPick it in *Selected avatar*, press **Delete…**, then prepare it again from its video.")
    return "\n".join(lines)


def older_markdown(entries: list[dict[str, Any]]) -> str:
    """Avatars made by older preprocessing rules: which, and how to bring them up to date."""
    names = ", ".join(f"`{m['name']}`" for m in entries)
    many = len(entries) > 1
    return (
        f"**{len(entries)} avatar{'s' if many else ''} {OLDER_RULES}:** {names}. They still load and render. "
        f"Pick one in *Selected avatar*: {REPREPARE_HOW[0].lower()}{REPREPARE_HOW[1:]}"
    )


def suggest_name(video: str | None, current: str, taken: list[str]) -> str:
    """An avatar name from the file name (letters, digits, '_' and '-'), not already taken."""
    if current and current.strip():
        return current
    if not video:
        return current
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(video).stem).strip("_-") or "avatar"
    stem = stem[:56]
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}-{n}", n + 1
    return name


def models_banner(engine: Engine) -> str:
    """One line above the tabs: models ready, weights being fetched (with progress), loading, or what is wrong."""
    state, detail = engine.model_state()
    if state == "ready":
        return f"**Models ready** ({detail}) · models `{engine.paths.models_dir}` · avatars `{engine.store.root}`"
    if state == "fetching":
        return f"**Fetching the weights** into `{engine.paths.models_dir}`: {html.escape(detail or '')} … (the models load when it ends)"
    if state in ("loading", "idle"):
        return f"**Loading the models** from `{engine.paths.models_dir}` … (actions wait for them)"
    return (
        f"**Models not loaded:** {html.escape(engine.model_problem(detail))} Press **Fetch weights** in the "
        f"**System** tab (or run `{FETCH_COMMAND}`); the models load when the fetch ends."
    )


def status_view(status: dict) -> str:
    """The live bot's state, speed and what to do next."""
    state = status["state"]
    head = f"Bot: **{state}**"
    if status.get("avatar"):
        head += f" · avatar `{status['avatar']}` · {status.get('transport')} · {status.get('mode')}"
    fps = f"{status['fps']:.1f}" if status.get("fps") is not None else "–"
    lat = f"{status['mouth_latency_ms']:.0f} ms" if status.get("mouth_latency_ms") is not None else "–"
    realtime = {True: "yes", False: "no", None: "–"}[status.get("realtime")]
    viewer = str(status.get("viewers") or 0) if status.get("viewer_connected") else "none"
    lines = [
        head,
        "",
        "| Uptime | FPS | Mouth latency | Frames | Real time | Viewers |",
        "|---|---|---|---|---|---|",
        f"| {format_duration(status.get('uptime_s') or 0)} | {fps} | {lat} | {status.get('frames', 0):,} | {realtime} | {viewer} |",
    ]
    for viewer in status.get("viewer_stats") or ():
        fps = "–" if viewer.get("fps") is None else f"{viewer['fps']:.1f} fps"
        lines.append(
            f"\nViewer `{html.escape(str(viewer.get('viewer')))}`: {html.escape(str(viewer.get('state')))}, {fps} received "
            f"({viewer.get('frames_sent', 0):,} frames sent, {viewer.get('backlog', 0)} queued)"
        )
    if status.get("transport") == "daily" and state == "running":
        following = status.get("following")
        lines.append(f"\nFollowing: **{html.escape(following)}**" if following else "\nFollowing: nobody yet")
    if status.get("warning") and str(status["warning"]).startswith("left:"):
        lines.append(f"\n{html.escape(status['warning'])}")
    elif status.get("warning"):
        lines.append(f"\n**Warning:** {html.escape(status['warning'])}")
    if status.get("last_error"):
        lines.append(f"\n**Last error:** {html.escape(status['last_error'])}")
    if state == "stopped":
        lines.append("\nThe bot is stopped. Pick an avatar and press **Start**.")
    elif state == "error":
        lines.append("\nThe bot stopped on the error above: fix it and press **Start** (**Stop** clears it).")
    elif state == "running" and not status.get("viewer_connected"):
        where = (
            "open the live page below and press Start there"
            if status.get("transport") == "local"
            else "join the Daily room"
        )
        lines.append(f"\nWaiting for a viewer: {where}.")
    return "\n".join(lines)


BOTS_HEADERS = [
    "bot",
    "state",
    "avatar",
    "transport",
    "where",
    "process",
    "viewers",
    "fps",
    "frames",
    "uptime",
    "last error",
]


def bots_rows(bots: list[dict]) -> list[list]:
    """One row per bot for the Live tab's table (running bots first, then the last ones that ended)."""
    order = sorted(bots, key=lambda b: b["state"] not in ("starting", "running", "stopping"))
    return [
        [
            b.get("bot_id") or "",
            b["state"],
            b.get("avatar") or "",
            b.get("transport") or "",
            b.get("url") or b.get("room_url") or "",
            f"worker pid {b['worker_pid']}" if b.get("worker_pid") else "panel",
            b.get("viewers", 0),
            "" if b.get("fps") is None else round(b["fps"], 1),
            b.get("frames", 0),
            format_duration(b.get("uptime_s") or 0),
            b.get("last_error") or "",
        ]
        for b in order
    ]


def service_view(stats: dict | None, max_bots: int) -> str:
    """The shared generation service: what every bot's sessions cost together, and what is left."""
    if not stats:
        return f"**Generation service:** starts with the first bot (up to {max_bots} bots at once, one copy of the models)."
    cost = "–" if stats.get("frame_cost_ms") is None else f"{stats['frame_cost_ms']:.0f} ms"
    capacity = "measuring…" if stats.get("capacity") is None else str(stats["capacity"])
    left = "–" if stats.get("capacity_left") is None else str(stats["capacity_left"])
    batch = "–" if stats.get("mean_batch") is None else f"{stats['mean_batch']:.1f}"
    gpu = "–" if stats.get("gpu_memory_mb") is None else f"{stats['gpu_memory_mb']:,.0f} MB"
    replicas = stats.get("replicas")
    if replicas is not None:  # the Ray Serve backend: one line per replica
        rows = [
            f"**Generation service on Ray Serve** · {len(replicas)} replicas · {stats['sessions']} sessions · "
            f"{stats['frames_per_s']:.1f} frames/s · capacity left {stats.get('capacity_left') if stats.get('capacity_left') is not None else '–'}",
            "",
            "| Replica | PID | Sessions | Frames/s | Late (given up) | Cost per frame | Capacity |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in replicas:
            rs = r["stats"]
            late = f"{100 * rs['skipped_frames'] / max(1, rs['frames'] + rs['skipped_frames']):.1f} %"
            cost = "–" if rs.get("frame_cost_ms") is None else f"{rs['frame_cost_ms']:.0f} ms"
            rows.append(
                f"| {r['replica']} | {r['pid']} | {len(r['sessions'])} | {rs['frames_per_s']:.1f} | {late} | {cost} "
                f"| {rs.get('capacity') if rs.get('capacity') is not None else 'measuring…'} |"
            )
        return "\n".join(rows)
    return "\n".join(
        [
            f"**Generation service** on {stats.get('device', '?')} · one copy of the models for every bot and viewer",
            "",
            "| Sessions | Queued frames | Frames/s | Mean batch | Cost per frame | Capacity (25 fps) | Left | GPU memory |",
            "|---|---|---|---|---|---|---|---|",
            f"| {stats['sessions']} | {stats['queued_frames']} | {stats['frames_per_s']:.1f} | {batch} | {cost} "
            f"| {capacity} | {left} | {gpu} |",
        ]
    )


def page_view(status: dict, page_key: str | None = None) -> str:
    """The local page's link and frame; with the panel's viewer key (`?key=`) when its pages have one."""
    url = status.get("url")
    if status.get("transport") != "local" or not url or status["state"] not in ("starting", "running"):
        return ""
    safe = html.escape(page_url(url, page_key))
    port = urlsplit(url).port or DEFAULT_PORT
    return (
        f'<p><b>Live page:</b> <a href="{safe}" target="_blank" rel="noopener">{safe}</a> (opens in a new tab). '
        "Press Start there and allow the microphone; one viewer at a time. Browsers allow the microphone only "
        "on https or on localhost / 127.0.0.1, so from another machine use an SSH tunnel "
        f"(<code>ssh -L {port}:127.0.0.1:{port} user@this-machine</code>) or the Daily transport.</p>"
        f'<iframe src="{safe}" title="MuseTalk live page" allow="microphone; autoplay" '
        'style="width:100%;height:640px;border:1px solid #8884;border-radius:8px"></iframe>'
    )


def weight_rows(files: list[dict[str, Any]]) -> list[list[Any]]:
    """The System tab's weights table: one row per file."""
    rows = []
    for f in files:
        note = f["detail"]
        if f["state"] != "present" and not f["required"] and f["without"]:
            note = (note + "; " if note else "") + f"without it: {f['without']}"
        size = format_bytes(f["size"]) if f["size"] is not None else ""
        rows.append([f["file"], f["part"], "required" if f["required"] else "optional", f["state"], size, note])
    return rows


def system_markdown(info: dict[str, Any]) -> str:
    """Device, models, folders and versions, then the weights by part and what to do about missing ones."""
    gpu = (
        info["gpu"]
        or "none (CUDA not available): preparation and render run slowly; the live bot cannot keep real time"
    )
    lines = [
        "| Item | Value |",
        "|---|---|",
        f"| Device | {info['device']} |",
        f"| GPU | {gpu} |",
        f"| Models | {html.escape(info['models_state'])} |",
        f"| Models folder | `{info['models_dir']}` |",
        f"| Avatars folder | `{info['avatars_dir']}` ({info['avatar_count']} avatars) |",
        "| Versions | " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + " |",
        "",
        "#### Weights",
        "",
        "| Part | Folder | State |",
        "|---|---|---|",
    ]
    for part in info["weights"]:
        state = "present" if part["present"] else ("**missing**" if part["required"] else "missing (optional)")
        lines.append(f"| {part['part']} | `{part['folder']}` | {state} |")
    if info["fetch_errors"]:
        lines += ["", "Last fetch:", ""] + [f"- {html.escape(line)}" for line in info["fetch_errors"]]
    if any(not part["present"] and part["required"] for part in info["weights"]):
        lines.append(
            f"\n**Press Fetch weights** below (or run `{info['fetch_command']}` in the repository folder); "
            "the models load when the fetch ends."
        )
    else:
        lines.append(f"\nAll required weights are present (`{info['fetch_command']}` fetches any that go missing).")
    return "\n".join(lines)


def transcript_view(status: dict | None) -> str:
    """A say / conversation bot's turns (newest last), interruptions marked, each reply's latency."""
    if not status or status.get("mode") not in ("say", "conversation", "speech"):
        return "*Transcript: start a bot in Say or Conversation mode and pick it above.*"
    lines = [f"**Transcript of {status.get('bot_id')}** ({status.get('mode')})"]
    figures = []
    if status.get("turn_latency_ms") is not None:
        figures.append(f"last reply {status['turn_latency_ms']:.0f} ms after the user stopped speaking")
    if status.get("first_mouth_ms") is not None:
        figures.append(f"first TTS audio -> moving mouth {status['first_mouth_ms']:.0f} ms")
    if figures:
        lines.append(" · ".join(figures))
    turns = status.get("transcript") or []
    if not turns:
        lines.append("\n*Nothing said yet.*")
    for turn in turns:
        who = {"user": "User", "avatar": "Avatar", "error": "Error"}.get(turn["role"], turn["role"])
        extra = []
        if turn.get("latency_ms") is not None:
            extra.append(f"{turn['latency_ms']:.0f} ms")
        if turn.get("interrupted"):
            extra.append("interrupted")
        suffix = f" *({', '.join(extra)})*" if extra else ""
        lines.append(f"- **{who}**: {html.escape(turn['text'])}{suffix}")
    return "\n".join(lines)


def bot_config_view(config: dict) -> str:
    """The bot config in use (file, services; the key variables' names only)."""
    return "\n".join(
        [
            f"**Bot config** `{config['config']}` (what the next Say / Conversation bot speaks with)",
            "",
            f"- Speech-to-text: {html.escape(config['stt'])}",
            f"- LLM: {html.escape(config['llm'])}",
            f"- Text-to-speech: {html.escape(config['tts'])}",
            f"- System prompt: {html.escape(config['system_prompt'])}",
        ]
    )
