"""End to end: a real headless Chromium on the local page, talking to the real bot over WebRTC.

Inside a private network namespace (tests/netns.py: loopback ICE does not work) this test runs
the bot (`BotRunner`, local transport on 10.200.0.1, the tiny models, the prepared astronaut
avatar; this file run as a script, see `serve()`) and Debian's Chromium whose fake microphone
plays speech with
silence around it (2 s silence, speech, 2.5 s silence, looped by Chromium). Chromium is driven
over the DevTools pipe (tests/browser.py); a script injected into the page records, for every
video frame the browser presents (requestVideoFrameCallback), its timing and a 64x64 grey crop
of the avatar's face, and every 10 ms the loudness of the microphone and of the bot's audio.

What is asserted (measured on what the browser received, nothing stamped into frames):
* the bot sends real time (its /api/status: >= 20 fps, whatever the model's speed, since frames
  the device cannot make in time are shown idle) and the browser presents >= 70 % of what the bot
  reports sending, over >= 10 s (how much more depends on the CPU Chromium gets beside the bot);
* in silence the face matches the avatar's own frames (the idle loop), mouth included;
* during speech the mouth region differs from every idle frame while the rest of the face
  still matches one: the mouth moves;
and printed: fps, receive-to-display delay, mouth-onset latency (microphone speech onset ->
first moving mouth on screen), the bot's audio latency, the A/V offset between the bot's
voice and the mouth, and the bot's own figures from /api/status.

A second test opens the page in two Chromiums at once (silent microphones, small avatars), the
second with `?avatar=astro-mirror` (the astronaut clip mirrored, prepared into the same store):
each viewer gets its own session and its own avatar's video (the bot still sends >= 20 fps; each
browser presents >= 45 % of it: two browsers share CI's 2 cores with the bot), /api/status counts 2
viewers; when viewer 2's tab closes its session ends (1 viewer) and viewer 1's video goes on.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import media
import numpy as np
import pytest
from browser import Chromium, Page
from netns import SERVER_ADDRESS, PrivateNetwork
from viewers import (
    CROP,
    FACE_FRAMES_JS,
    LATENCY_BUDGET_S,
    PAGE_KEY,
    bot_status_of,
    browser_skip_reason,
    face_box,
    insecure_origin_flags,
    open_viewer,
    reference_crops,
)

REPO = Path(__file__).resolve().parent.parent
MEASURE_S = 14.0
LEAD_SILENCE_S, TAIL_SILENCE_S = 2.0, 2.5
# Two viewers: two Chromiums and the bot share the 2 cores, so small avatars, a shorter measurement.
TWO_VIEWERS_MEASURE_S = 8.0
AFTER_LEAVE_MEASURE_S = 3.0
# The bot's own frame rate (its /api/status, frames its viewer pipelines emit per second) is the product's
# line: real time on any device, since a frame the model cannot make in time is shown idle.
BOT_MIN_FPS = 20.0
# What the browser presents of it depends on the CPU Chromium gets beside the bot, so it is judged as a share
# of what the bot reports sending, not against a fixed figure. One viewer on an idle 2-core box presents
# ~24.9 of 25 fps. Two Chromiums decoding beside the bot on 2 cores present 17-19 fps in some runs while the
# bot sends 25 (what that test is about is which frames each viewer gets).
PRESENTED_SHARE = 0.7
TWO_VIEWERS_PRESENTED_SHARE = 0.45
SMALL_SIDE = 256
OTHER_AVATAR = "astro-mirror"

MEASURE_JS = r"""
(() => {
  const cfg = %(cfg)s;
  const mt = window.musetalk;
  const m = { frames: [], audio: [], t0: performance.now(), done: false, errors: [] };
  window.__musetalkMeasure = m;
%(face_frames)s  if (!cfg.audio) return true;

  const ac = new AudioContext();
  ac.resume();
  const level = (stream) => {
    const analyser = ac.createAnalyser();
    analyser.fftSize = 512;
    ac.createMediaStreamSource(stream).connect(analyser);
    const buf = new Float32Array(analyser.fftSize);
    return () => { analyser.getFloatTimeDomainData(buf); let s = 0; for (const v of buf) s += v * v; return Math.sqrt(s / buf.length); };
  };
  const mic = level(mt.mic);
  const bot = level(new MediaStream(mt.stream.getAudioTracks()));
  m.timer = setInterval(() => { if (!m.done) m.audio.push([performance.now(), mic(), bot()]); }, 10);
  return true;
})()
"""

# Frames recorded so far (handed over and forgotten; the recording goes on) and the video's
# WebRTC counters now (received, decoded, dropped by the browser since the connection began).
TAKE_FRAMES_JS = """
(async () => {
  const m = window.__musetalkMeasure;
  const video = {};
  (await window.musetalk.pc.getStats()).forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "video") Object.assign(video, r);
  });
  return { frames: m.frames.splice(0), errors: m.errors, video };
})()
"""


_SKIP_REASON = browser_skip_reason() if __name__ != "__main__" else None
pytestmark = [
    pytest.mark.slow,
    pytest.mark.realtime,
    pytest.mark.skipif(_SKIP_REASON is not None, reason=str(_SKIP_REASON)),
]


def fake_microphone(speech: Path, out: Path) -> tuple[Path, float]:
    """Silence, speech, silence as 16-bit mono WAV (Chromium loops it). Returns (path, cycle seconds)."""
    with wave.open(str(speech)) as wf:
        rate = wf.getframerate()
        pcm = np.frombuffer(wf.readframes(wf.getnframes()), dtype=np.int16)
    lead = np.zeros(int(LEAD_SILENCE_S * rate), np.int16)
    tail = np.zeros(int(TAIL_SILENCE_S * rate), np.int16)
    audio = np.concatenate([lead, pcm, tail])
    with wave.open(str(out), "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(rate)
        wf.writeframes(audio.tobytes())
    return out, len(audio) / rate


def onsets(times: np.ndarray, loud: np.ndarray, min_quiet_s: float = 0.8) -> list[float]:
    """Times where `loud` turns on after at least `min_quiet_s` of quiet."""
    found, quiet_since = [], times[0] if len(times) else 0.0
    prev = True  # ignore a start in the middle of speech
    for t, on in zip(times, loud):
        if on and not prev and t - quiet_since >= min_quiet_s * 1000:
            found.append(float(t))
        if not on and prev:
            quiet_since = t
        prev = on
    return found


def first_after(times: np.ndarray, flags: np.ndarray, start: float, within_ms: float) -> float | None:
    idx = np.nonzero((times >= start) & (times <= start + within_ms) & flags)[0]
    return float(times[idx[0]]) if len(idx) else None


def median_or_none(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def fmt(value: float | None, unit: str = "ms") -> str:
    return "n/a" if value is None else f"{value:.0f} {unit}"


@pytest.fixture
def server_env(tiny_models_dir, avatar_store):
    return {
        **os.environ,
        "MUSETALK_MODELS_DIR": str(tiny_models_dir),
        "MUSETALK_AVATARS_DIR": str(avatar_store.root),
        "MUSETALK_DEVICE": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "PYTHONUNBUFFERED": "1",
    }


@contextlib.contextmanager
def bot_server(net: PrivateNetwork, env: dict, avatar: str, port: int, log_path: Path, cwd: Path):
    """This file run as `serve` inside the namespace; yields the process once its page is served.

    On leaving, the bot is stopped with SIGINT (killed if it does not end within 30 s)."""
    with open(log_path, "w") as server_log:
        server = net.popen(
            [sys.executable, __file__, "serve", avatar, SERVER_ADDRESS, str(port), str(LATENCY_BUDGET_S), PAGE_KEY],
            cwd=cwd, env=env, stdout=server_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while "READY" not in log_path.read_text() and time.monotonic() < deadline:
                assert server.poll() is None, f"the server exited:\n{log_path.read_text()}"
                time.sleep(0.2)
            assert "READY" in log_path.read_text(), log_path.read_text()
            yield server
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGINT)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()


def start_measuring(page: Page, avatar, box, *, audio: bool) -> None:
    aw, ah = avatar.size
    cfg = {"crop": CROP, "box": list(box), "videoW": aw, "videoH": ah, "audio": audio}
    assert page.evaluate(MEASURE_JS % {"cfg": json.dumps(cfg), "face_frames": FACE_FRAMES_JS}, user_gesture=True)


def test_browser_sees_and_hears_the_avatar(server_env, prepared_avatar, speech, tmp_path):
    mic_wav, cycle_s = fake_microphone(speech, tmp_path / "mic.wav")
    log_path = tmp_path / "server.log"
    port = 7861
    url = f"http://{SERVER_ADDRESS}:{port}/?key={PAGE_KEY}"  # beyond loopback: the page's key

    with PrivateNetwork() as net, bot_server(net, server_env, prepared_avatar.name, port, log_path, tmp_path) as server:
        with Chromium(fake_audio=mic_wav, wrap=net.wrap, extra_flags=insecure_origin_flags(port)) as browser:
            page, video_size = open_viewer(browser, url, log_path)
            box = face_box(prepared_avatar)
            start_measuring(page, prepared_avatar, box, audio=True)
            time.sleep(MEASURE_S)
            data = page.evaluate(
                "(() => { const m = window.__musetalkMeasure; m.done = true; clearInterval(m.timer); "
                "return {frames: m.frames, audio: m.audio, errors: m.errors}; })()",
                timeout=60,
            )
            stats = page.evaluate(
                "(async () => { const out = {}; (await window.musetalk.pc.getStats()).forEach((r) => {"
                " if (r.type === 'inbound-rtp') out[r.kind] = r; }); return out; })()"
            )
            bot_status = bot_status_of(page)
            rx_fps_on_page = page.evaluate("window.musetalk.rxFps")
    server_output = log_path.read_text()
    assert server.returncode == 0, server_output[-3000:]
    assert re.search(r"viewer \S+ connected", server_output), server_output[-3000:]
    assert "STOPPED stopped" in server_output, server_output[-3000:]

    analyse(data, stats, bot_status, rx_fps_on_page, prepared_avatar, box, video_size, cycle_s)


def analyse(data, stats, bot_status, rx_fps_on_page, avatar, box, video_size, cycle_s) -> None:
    assert not data["errors"], data["errors"]
    frames = data["frames"]
    decoded = stats.get("video", {}).get("framesDecoded")
    assert len(frames) >= 2 * MEASURE_S, (
        f"the browser presented {len(frames)} frames in {MEASURE_S:.0f} s (decoded in all: {decoded}): the video "
        f"stalls. Bot status: {bot_status}"
    )
    t = np.array([f["t"] for f in frames])
    shown = np.array([f["shown"] for f in frames])
    # ---- frame rate over the whole measurement (>= 10 s), counted by the browser (presentedFrames)
    fps, span_s = presented_fps(frames)
    assert span_s >= 10.0, f"only {span_s:.1f} s of video"

    # ---- face analysis: upper face picks the idle frame, the mouth is compared with it
    refs = reference_crops(avatar, box, video_size)
    got = np.stack(
        [np.frombuffer(base64.b64decode(f["g"]), np.uint8).reshape(CROP, CROP).astype(np.float32) for f in frames]
    )
    upper = slice(int(0.08 * CROP), int(0.40 * CROP))
    mouth_rows, mouth_cols = slice(int(0.62 * CROP), int(0.92 * CROP)), slice(int(0.25 * CROP), int(0.75 * CROP))
    upper_err = np.abs(got[:, None, upper, :] - refs[None, :, upper, :]).mean(axis=(2, 3))  # (frames, N)
    best = upper_err.argmin(axis=1)
    upper_best = upper_err[np.arange(len(got)), best]
    mouth_err = np.abs(got[:, mouth_rows, mouth_cols] - refs[best][:, mouth_rows, mouth_cols]).mean(axis=(1, 2))

    # ---- audio: speech onsets at the microphone and in the bot's voice
    audio = np.array(data["audio"])
    at, mic, bot = audio[:, 0], audio[:, 1], audio[:, 2]
    mic_on = mic > max(0.02, 0.1 * mic.max())
    bot_on = bot > max(0.01, 0.1 * bot.max()) if bot.max() > 0 else np.zeros_like(bot, bool)
    mic_onsets = onsets(at, mic_on)
    bot_onsets = onsets(at, bot_on)

    # frames shown while the microphone has been quiet for a while (and the bot too): idle phase
    def quiet_around(time_ms: float, margin_ms: float = 500) -> bool:
        sel = (at >= time_ms - 1500) & (at <= time_ms + margin_ms)
        return bool(sel.any()) and not mic_on[sel].any() and not bot_on[sel].any()

    idle = np.array([quiet_around(x) for x in t])
    assert idle.sum() >= 20, "not enough silent stretches were observed"
    idle_mouth = np.median(mouth_err[idle])
    threshold = max(3 * idle_mouth, idle_mouth + 6.0)
    moving = mouth_err > threshold

    # frames shown while the bot was speaking (its voice is the room's voice, frame-aligned)
    def bot_speaking(time_ms: float) -> bool:
        sel = (at >= time_ms - 60) & (at <= time_ms + 60)
        return bool(bot_on[sel].any())

    speaking = np.array([bot_speaking(x) for x in t])

    mouth_latencies, av_offsets, audio_latencies = [], [], []
    for onset in mic_onsets:
        mouth = first_after(t, moving, onset, 4000)
        voice = next((b for b in bot_onsets if onset <= b <= onset + 4000), None)
        if mouth is not None:
            mouth_latencies.append(mouth - onset)
        if voice is not None:
            audio_latencies.append(voice - onset)
        if mouth is not None and voice is not None:
            av_offsets.append(mouth - voice)
    rx_to_display = [f["shown"] - f["rx"] for f in frames if f["rx"]]
    video_stats = stats.get("video", {})
    jitter_ms = None
    if video_stats.get("jitterBufferEmittedCount"):
        jitter_ms = 1000 * video_stats["jitterBufferDelay"] / video_stats["jitterBufferEmittedCount"]

    print(
        "\n=== browser end to end (headless Chromium <-> bot, private netns) ===\n"
        f"video {video_size[0]}x{video_size[1]}: {fps:.1f} fps presented over {span_s:.1f} s "
        f"({len(frames)} frames; page counter {rx_fps_on_page and round(rx_fps_on_page, 1)} fps); "
        f"frames dropped {video_stats.get('framesDropped')}, decoded {video_stats.get('framesDecoded')}\n"
        f"receive-to-display p50 {fmt(median_or_none(rx_to_display))}, jitter buffer {fmt(jitter_ms)}, "
        f"display delay after rVFC p50 {fmt(float(np.median(shown - t)))}\n"
        f"speech onsets at the mic: {len(mic_onsets)} (cycle {cycle_s:.1f} s); bot voice onsets: {len(bot_onsets)}\n"
        f"mouth-onset latency (mic speech -> moving mouth on screen) p50 {fmt(median_or_none(mouth_latencies))} {np.round(mouth_latencies)}\n"
        f"bot audio latency (mic speech -> bot voice heard) p50 {fmt(median_or_none(audio_latencies))} {np.round(audio_latencies)}\n"
        f"A/V offset (moving mouth - bot voice; + = video later) p50 {fmt(median_or_none(av_offsets))} {np.round(av_offsets)}\n"
        f"mouth residual vs idle frame: silence p50 {idle_mouth:.1f}, speech p50 "
        f"{np.median(mouth_err[speaking]) if speaking.any() else float('nan'):.1f} (threshold {threshold:.1f}); "
        f"upper face residual p50 {np.median(upper_best):.1f}\n"
        f"moving-mouth frames: {moving[speaking].mean() if speaking.any() else 0:.0%} while the bot speaks, "
        f"{moving[idle].mean():.0%} in silence\n"
        f"bot status: {bot_status}"
    )

    bot_fps = bot_status.get("fps") or 0.0
    assert bot_fps >= BOT_MIN_FPS, f"the bot sends {bot_fps:.1f} fps (its status: {bot_status})"
    assert fps >= PRESENTED_SHARE * bot_fps, f"{fps:.1f} fps presented of the {bot_fps:.1f} the bot sends"
    # Per-viewer truth: the status counts what this viewer's video track sent, and the bot's fps is that
    # (its slowest viewer's), close to what the page counted arriving.
    (viewer,) = bot_status["viewer_stats"]
    assert viewer["state"] == "connected" and viewer["frames_sent"] >= 100, viewer
    assert viewer["fps"] == bot_fps, (viewer, bot_fps)
    if rx_fps_on_page:
        assert abs(viewer["fps"] - rx_fps_on_page) <= 0.25 * rx_fps_on_page, (viewer, rx_fps_on_page)
    # Silence: the picture is the avatar's idle loop (upper face and mouth match an avatar frame).
    assert np.median(upper_best[idle]) < 12, "the idle video does not match the avatar's frames"
    assert moving[idle].mean() < 0.1, "the mouth moves in silence"
    # Speech: the mouth region changes while the upper face still follows the loop.
    assert len(mic_onsets) >= 1, "the fake microphone's speech was not heard in the page"
    assert speaking.sum() >= 10, "the bot's voice (mirror mode) was not heard in the browser"
    # On this CPU only part of the speech frames can be generated in time (the device makes about
    # 1000 / model_ms_per_frame of the 25 frames a second); the rest are shown idle. Of the part the
    # device can make, at least 40 % must show a moving mouth (some generated frames are pauses).
    cost_ms = bot_status.get("model_ms_per_frame")
    assert cost_ms, f"the bot reports no per-frame cost: {bot_status}"
    can_generate = min(1.0, 1000.0 / cost_ms / 25.0)
    assert moving[speaking].sum() >= 5 and moving[speaking].mean() > 0.4 * can_generate, (
        f"the mouth hardly moved while the bot spoke: {moving[speaking].mean():.0%} of the speech frames, where the "
        f"device generates {can_generate:.0%} of them"
    )
    assert mouth_latencies, "no moving mouth after a speech onset"


@pytest.fixture(scope="module")
def two_small_avatars(models, avatar_store, face_video, tmp_path_factory):
    """Two small avatars in the bot's store: the astronaut (the bot's own) and the same clip
    mirrored (`?avatar=astro-mirror`), so that every frame of one differs from the other's.
    1 s at 256x256 with the landmark-polygon mask: cheap to prepare and to stream."""
    from musetalk.avatar.prepare import prepare_avatar
    from musetalk.config import PrepareSettings
    from musetalk.media import read_video, write_mp4

    folder = tmp_path_factory.mktemp("two-viewers")
    settings = PrepareSettings(parsing_mode="polygon", max_side=SMALL_SIDE, max_seconds=1.0)
    frames, info = read_video(face_video, max_side=SMALL_SIDE, max_seconds=1.0)
    mirrored = write_mp4(
        folder / "astronaut-mirrored.mp4", (np.ascontiguousarray(f[:, ::-1]) for f in frames),
        frame_count=len(frames), size=info.size, audio_path=media.silence_wav(folder / "silence.wav", seconds=1.0),
    )  # fmt: skip
    prepare_avatar(models, avatar_store, face_video, "astro-small", settings)
    prepare_avatar(models, avatar_store, mirrored, OTHER_AVATAR, settings)
    return avatar_store.load("astro-small"), avatar_store.load(OTHER_AVATAR)


def wait_for_viewers(page: Page, count: int, timeout: float) -> tuple[dict, float]:
    """Poll the bot's /api/status until it reports `count` viewers; returns the last status and the seconds it took."""
    start = time.monotonic()
    status = bot_status_of(page)
    while status.get("viewers") != count and time.monotonic() - start < timeout:
        time.sleep(0.1)
        status = bot_status_of(page)
    return status, time.monotonic() - start


def match_avatars(frames: list[dict], own_refs: np.ndarray, other_refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the mean grey difference to the nearest frame of its own avatar and of the other one."""
    got = np.stack(
        [np.frombuffer(base64.b64decode(f["g"]), np.uint8).reshape(CROP, CROP).astype(np.float32) for f in frames]
    )

    def nearest(refs: np.ndarray) -> np.ndarray:
        return np.min([np.abs(got - ref).mean(axis=(1, 2)) for ref in refs], axis=0)

    return nearest(own_refs), nearest(other_refs)


def presented_fps(frames: list[dict]) -> tuple[float, float]:
    """(frames per second presented, seconds spanned) between the first and the last callback.

    Counted with the browser's own `presentedFrames`: a callback the page's busy main thread
    missed still counts the frames the browser presented meanwhile."""
    t = np.array([f["t"] for f in frames])
    span_s = (t[-1] - t[0]) / 1000 if len(t) >= 2 else 0.0
    presented = frames[-1]["n"] - frames[0]["n"] if len(t) >= 2 else 0
    return (presented / span_s if span_s > 0 else 0.0), span_s


def judge_viewer(
    label: str, taken: dict, before: dict, refs: dict, own: str, window_s: float, bot_fps: float
) -> list[str]:
    """One viewer's recording: prints its figures, returns what fails (video flowing at
    TWO_VIEWERS_PRESENTED_SHARE of the `bot_fps` the bot reports sending, its own avatar's frames and not
    the other's)."""
    frames = taken["frames"]
    if taken["errors"] or len(frames) < 2 * window_s:
        return [f"{label}: {len(frames)} frames presented in {window_s:.0f} s; page errors {taken['errors']}"]
    fps, span_s = presented_fps(frames)
    sizes = {(f["w"], f["h"]) for f in frames}
    other = next(name for name in refs if name != own)
    own_err, other_err = match_avatars(frames, refs[own], refs[other])
    counts = {
        k: taken["video"].get(k, 0) - before["video"].get(k, 0)
        for k in ("framesReceived", "framesDecoded", "framesDropped")
    }
    print(
        f"{label}: {fps:.1f} fps presented over {span_s:.1f} s ({len(frames)} frame callbacks, {sorted(sizes)}; "
        f"received {counts['framesReceived']}, decoded {counts['framesDecoded']}, dropped {counts['framesDropped']}); "
        f"difference to the nearest frame of {own} p50 {np.median(own_err):.1f} (max {own_err.max():.1f}), "
        f"of {other} p50 {np.median(other_err):.1f} (min {other_err.min():.1f})"
    )
    checks = [
        (span_s >= 0.75 * window_s, f"only {span_s:.1f} s of video"),
        (fps >= TWO_VIEWERS_PRESENTED_SHARE * bot_fps, f"{fps:.1f} fps presented of the {bot_fps:.1f} the bot sends"),
        (sizes == {(SMALL_SIDE, SMALL_SIDE)}, f"video size {sorted(sizes)}"),
        (np.median(own_err) < 12, f"does not show {own}'s idle frames"),
        ((own_err < other_err).mean() >= 0.95, f"shows frames of {other}"),
    ]
    return [f"{label}: {problem}" for ok, problem in checks if not ok]


def test_two_viewers_each_get_their_own_avatar(server_env, two_small_avatars, tmp_path):
    avatar, other = two_small_avatars
    quiet = media.silence_wav(tmp_path / "quiet.wav", seconds=2.0)
    log_path = tmp_path / "server.log"
    port = 7862
    url = f"http://{SERVER_ADDRESS}:{port}/?key={PAGE_KEY}"  # beyond loopback: the page's key
    box1, box2 = face_box(avatar), face_box(other)
    # Both avatars sampled in each viewer's face box: a viewer's frames must be nearer its own.
    refs1 = {
        avatar.name: reference_crops(avatar, box1, avatar.size),
        other.name: reference_crops(other, box1, avatar.size),
    }
    refs2 = {
        avatar.name: reference_crops(avatar, box2, other.size),
        other.name: reference_crops(other, box2, other.size),
    }

    with PrivateNetwork() as net, bot_server(net, server_env, avatar.name, port, log_path, tmp_path) as server:
        flags = insecure_origin_flags(port)
        with (
            Chromium(fake_audio=quiet, wrap=net.wrap, extra_flags=flags) as browser1,
            Chromium(fake_audio=quiet, wrap=net.wrap, extra_flags=flags) as browser2,
        ):
            page1, size1 = open_viewer(browser1, url, log_path)
            page2, size2 = open_viewer(browser2, f"{url}&avatar={other.name}", log_path)
            both, _ = wait_for_viewers(page1, 2, timeout=10)
            assert both.get("viewers") == 2, f"/api/status with two viewers: {both}"
            start_measuring(page1, avatar, box1, audio=False)
            start_measuring(page2, other, box2, audio=False)
            start1, start2 = page1.evaluate(TAKE_FRAMES_JS), page2.evaluate(TAKE_FRAMES_JS)
            time.sleep(TWO_VIEWERS_MEASURE_S)
            together1, together2 = (
                page1.evaluate(TAKE_FRAMES_JS, timeout=60),
                page2.evaluate(TAKE_FRAMES_JS, timeout=60),
            )
            during = bot_status_of(page1)  # what the bot reports sending while both watched

            # Viewer 2 closes its tab (the page's pagehide closes its peer connection): its session ends.
            page2.call("Page.close")
            alone, left_after_s = wait_for_viewers(page1, 1, timeout=10)
            leaving1 = page1.evaluate(TAKE_FRAMES_JS, timeout=60)  # shown while viewer 2 was leaving: not judged
            time.sleep(AFTER_LEAVE_MEASURE_S)
            after1 = page1.evaluate(TAKE_FRAMES_JS, timeout=60)
            after = bot_status_of(page1)
            still_connected = page1.evaluate("window.musetalk.pc && window.musetalk.pc.connectionState")
    server_output = log_path.read_text()
    assert server.returncode == 0, server_output[-3000:]
    assert len(re.findall(r"viewer \S+ connected", server_output)) == 2, server_output[-3000:]
    assert re.search(r"viewer \S+ left", server_output), server_output[-3000:]

    print(
        "\n=== two browser viewers of one bot (two headless Chromiums, private netns) ===\n"
        f"videos {size1[0]}x{size1[1]} ({avatar.name}) and {size2[0]}x{size2[1]} ({other.name}?avatar=)\n"
        f"bot status with both: viewers {both.get('viewers')}, fps {during.get('fps')}; "
        f"after viewer 2 closed its tab: viewers {alone.get('viewers')} after {left_after_s:.1f} s, fps {after.get('fps')}"
    )
    sent, sent_after = during.get("fps") or 0.0, after.get("fps") or 0.0
    problems = [
        *judge_viewer("viewer 1 (both watching)", together1, start1, refs1, avatar.name, TWO_VIEWERS_MEASURE_S, sent),
        *judge_viewer("viewer 2 (both watching)", together2, start2, refs2, other.name, TWO_VIEWERS_MEASURE_S, sent),
        *judge_viewer("viewer 1 (after viewer 2 left)", after1, leaving1, refs1, avatar.name, AFTER_LEAVE_MEASURE_S,
                      sent_after),
    ]  # fmt: skip
    assert sent >= BOT_MIN_FPS and sent_after >= BOT_MIN_FPS, f"the bot sends {sent} / {sent_after} fps: {during}"
    assert alone.get("viewers") == 1, f"viewer 2 closed its tab, but its session did not end within 10 s: {alone}"
    assert still_connected == "connected", f"viewer 1's connection is {still_connected!r} after viewer 2 left"
    assert not problems, "; ".join(problems)


def serve(avatar: str, host: str, port: str, latency_budget_s: str, page_key: str) -> int:
    """The bot for this test, run inside the namespace: `python test_bot_browser.py serve ...`.

    Models and avatars come from MUSETALK_MODELS_DIR / MUSETALK_AVATARS_DIR (the tiny ones).
    Prints READY once the page is served; SIGINT/SIGTERM stop the bot and print its state.
    """
    import threading

    from musetalk.avatar.store import AvatarStore
    from musetalk.bot.processor import LiveSettings
    from musetalk.bot.runner import BotRunner
    from musetalk.bot.transports import TransportSettings
    from musetalk.config import ModelPaths, avatars_dir_from_env, models_dir_from_env, runtime_from_env
    from musetalk.models import load_models

    models = load_models(ModelPaths(models_dir_from_env()), runtime_from_env())
    runner = BotRunner(models)
    settings = LiveSettings(latency_budget_s=float(latency_budget_s))
    transport = TransportSettings(kind="local", host=host, port=int(port), page_key=page_key)
    status = runner.start(avatar, transport, settings, avatar_store=AvatarStore(avatars_dir_from_env()))
    print("READY", status.url, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(0.5) and runner.status().state == "running":
        pass
    final = runner.stop(timeout=15)
    print("STOPPED", final.state, final.last_error or "", flush=True)
    return 0 if final.state == "stopped" else 1


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "serve":
    sys.exit(serve(*sys.argv[2:]))
