"""Say and conversation modes end to end, as a browser sees and hears them.

The real CLI (`start_pipecat_server.py --local --mode say|conversation`, the tiny models, the
prepared astronaut avatar, a 2 s latency budget as in test_bot_browser.py) runs in a private
network namespace (tests/netns.py) beside Debian's headless Chromium, which opens its local page
over WebRTC. The page records every presented video frame (its display time and a 64x64 grey
crop of the face, as test_bot_browser.py does) and, on the audio thread (an AudioWorklet, so a
busy main thread leaves no gaps), the loudness of the microphone and of the bot's voice in ~11 ms
blocks, timed by getOutputTimestamp() at the moment they are heard. Whatever the test does to
the bot (a line typed on the CLI's stdin) is marked on the page's clock (`performance.now()`)
just before it is done, so every figure is "as seen and heard at the browser", the network and
the browser's jitter buffers included. The bot's silence is digital (exactly 0), so "its voice
starts" is the first non-silent block and "it stops" the end of the last one.

* Say mode (silent microphone): a long line typed -> its first sound at the browser (<= 4 s);
  the mouth moves while the avatar speaks (mouth region unlike every idle frame, judged as in
  test_bot_browser.py); the A/V offset (first moving mouth shown - first sound heard; + = video
  later, as test_bot_browser.py counts it) has its median over the three utterances within
  ITU-R BT.1359's [-125, +45] ms. "/stop" typed after ~2 s of speech: the voice's last sound
  ends within 300 ms and the mouth is still from then on; two short lines again: voice and mouth
  come back.
* Conversation mode (an OpenAI-compatible stand-in for STT and LLM, tests/openai_standin.py, run
  as its own process in the namespace; espeak voice): the fake microphone says "Tell me about
  the moon." (the stand-in transcribes exactly that) and the avatar answers at length; the user
  speaks again over the answer: the avatar's voice stops within 1 s of that utterance's onset at
  the microphone; /api/status has the user's turn and the avatar's turn marked interrupted.

Each test leaves the page's recording in its tmp folder (recording.json) for a closer look.
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
from dataclasses import dataclass
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
TESTS = Path(__file__).resolve().parent

_SKIP_REASON = browser_skip_reason()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.realtime,
    pytest.mark.skipif(_SKIP_REASON is not None, reason=str(_SKIP_REASON)),
]

# The bounds, measured at the browser.
SAY_TO_VOICE_MAX_MS = 4000.0
AV_MIN_MS, AV_MAX_MS = -125.0, 45.0  # ITU-R BT.1359: audio 125 ms late .. 45 ms early (+ = video later)
STOP_TO_SILENCE_MAX_MS = 300.0
BARGE_IN_TO_SILENCE_MAX_MS = 1000.0

BOT_SOUND = 1e-3  # RMS above which the bot's voice is not silent (its silence is digital: exactly 0)
BOT_VOICE_ON = 0.01  # RMS of the bot speaking (espeak speech is ~0.05-0.2)
MIC_ON = 0.02
IDLE_BEFORE_S = 2.5
SPEECH_BEFORE_STOP_MS = 2000.0
QUIET_AFTER_STOP_S = 2.5

LONG_LINE = (
    "This is a long announcement from the avatar. It goes on for a while, sentence after sentence, "
    "so that there is plenty of time to interrupt it before it is over. Nobody should hear the end of it."
)
SHORT_LINES = ("Hello again, I am back.", "And once more, with feeling.")

QUESTION = "Tell me about the moon."
BARGE_IN = "Stop, please."
LONG_REPLY = (
    "The moon is the only natural satellite of the earth. It is about a quarter of the size of our planet, "
    "and it is always showing us the same face. Its surface is covered with craters, mountains and wide dark "
    "plains of old lava. Twelve astronauts have walked on it, and they brought back rocks that are still "
    "studied today. Its gravity pulls on the oceans and makes the tides rise and fall twice a day."
)
SHORT_REPLY = "Okay, I will stop."
SLOW_SECOND_ANSWER_S = 1.5  # the stand-in LLM takes this long over the barge-in's answer (see below)
MIC_LEAD_S, MIC_GAP_S, MIC_TOTAL_S = 5.0, 7.0, 26.0

STANDIN_SCRIPT = r"""
import json, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
from openai_standin import OpenAIStandIn, message_text

cfg = json.loads(open(sys.argv[2]).read())
heard = []

def transcribe(wav):
    text = cfg["heard"][min(len(heard), len(cfg["heard"]) - 1)]
    heard.append(text)
    print("TRANSCRIBED", text, flush=True)
    return text

def reply(messages):
    said = next((message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")
    for text, answer, delay in cfg["replies"]:
        if said.strip().endswith(text):
            print("CHAT", json.dumps(said), "->", json.dumps(answer[:40]), flush=True)
            time.sleep(delay)
            return answer
    print("CHAT unexpected", json.dumps(said), flush=True)
    return "Sorry?"

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGINT, lambda *_: stop.set())
with OpenAIStandIn(transcribe=transcribe, reply=reply) as api:
    print("PORT", api.port, flush=True)
    stop.wait()
print("STANDIN STOPPED", flush=True)
"""


@pytest.fixture
def cli_env(tiny_models_dir, avatar_store, prepared_avatar):
    """The CLI's environment: the tiny models, the store holding the prepared astronaut (as test_bot_browser.py)."""
    return {
        **os.environ,
        "MUSETALK_MODELS_DIR": str(tiny_models_dir),
        "MUSETALK_AVATARS_DIR": str(avatar_store.root),
        "MUSETALK_DEVICE": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "PYTHONUNBUFFERED": "1",
    }


def avatar_config(folder: Path, name: str) -> Path:
    """The CLI's --config: its first avatar, already prepared."""
    path = folder / "realtime.yaml"
    path.write_text(f"{name}:\n  preparation: False\n  bbox_shift: 0\n")
    return path


@contextlib.contextmanager
def cli_bot(net: PrivateNetwork, env: dict, *, port: int, mode: str, bot_config: Path, config: Path, log_path: Path):
    """`start_pipecat_server.py --local` inside the namespace, stdin a pipe; yields it once its page is served.

    On leaving it gets Ctrl-C (SIGINT), as an operator would stop it (killed if it has not ended in 30 s)."""
    command = [
        sys.executable, str(REPO / "start_pipecat_server.py"), "--local", "--host", SERVER_ADDRESS,
        "--port", str(port), "--mode", mode, "--latency-budget", str(LATENCY_BUDGET_S), "--skip-checks",
        "--bot-config", str(bot_config), "--config", str(config), "--page-key", PAGE_KEY,
    ]  # fmt: skip
    with open(log_path, "w") as log:
        proc = net.popen(
            command, cwd=log_path.parent, env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while "Local page:" not in log_path.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, f"the CLI exited:\n{log_path.read_text()[-3000:]}"
                time.sleep(0.2)
            assert "Local page:" in log_path.read_text(), log_path.read_text()[-3000:]
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()


def page_now(page: Page) -> float:
    return float(page.evaluate("performance.now()"))


def type_line(page: Page, cli: subprocess.Popen, line: str) -> tuple[float, float]:
    """Type a line on the CLI's stdin. Returns the page's clock just before and just after writing it."""
    before = page_now(page)
    cli.stdin.write(line + "\n")
    cli.stdin.flush()
    return before, page_now(page)


# The page's recording. Video from viewers.FACE_FRAMES_JS: every presented frame's callback time, display
# time and a CROP x CROP grey crop of the face. Audio on the audio thread (an AudioWorklet: no gaps when the page's
# main thread is busy): the loudness (RMS) of the microphone and of the bot's voice in blocks of 4 x 128 samples,
# stamped with the audio clock, which getOutputTimestamp() ties to the page's clock at the moment a sample is heard.
MEASURE_JS = r"""
(async () => {
  const cfg = %(cfg)s;
  const mt = window.musetalk;
  const m = { frames: [], audio: [], clock: [], heard: null, done: false, errors: [] };
  window.__musetalkMeasure = m;
%(face_frames)s
  const ac = new AudioContext();
  await ac.resume();
  const worklet = `
    class Loudness extends AudioWorkletProcessor {
      constructor() { super(); this.sums = [0, 0]; this.n = 0; this.start = 0; this.out = []; }
      process(inputs) {
        if (this.n === 0) this.start = currentTime;
        for (let k = 0; k < 2; k++) {
          const ch = inputs[k] && inputs[k][0];
          if (ch) for (let i = 0; i < ch.length; i++) this.sums[k] += ch[i] * ch[i];
        }
        this.n += 128;
        if (this.n >= 512) {
          this.out.push([1000 * this.start, 1000 * (this.start + this.n / sampleRate),
                         Math.sqrt(this.sums[0] / this.n), Math.sqrt(this.sums[1] / this.n)]);
          this.sums = [0, 0]; this.n = 0;
          if (this.out.length >= 4) { this.port.postMessage(this.out); this.out = []; }
        }
        return true;
      }
    }
    registerProcessor("loudness", Loudness);`;
  await ac.audioWorklet.addModule(URL.createObjectURL(new Blob([worklet], { type: "application/javascript" })));
  const node = new AudioWorkletNode(ac, "loudness", { numberOfInputs: 2, numberOfOutputs: 1, outputChannelCount: [1] });
  ac.createMediaStreamSource(mt.mic).connect(node, 0, 0);
  ac.createMediaStreamSource(new MediaStream(mt.stream.getAudioTracks())).connect(node, 0, 1);
  const silent = ac.createGain();
  silent.gain.value = 0;
  node.connect(silent).connect(ac.destination);
  node.port.onmessage = (e) => { if (!m.done) for (const block of e.data) m.audio.push(block); };
  const tick = () => {
    const ts = ac.getOutputTimestamp();
    m.clock.push([performance.now(), 1000 * ac.currentTime, 1000 * ts.contextTime, ts.performanceTime]);
    if (ts.performanceTime > 0) m.heard = ts.performanceTime - 1000 * ts.contextTime;
  };
  // The browser's jitter buffers: cumulative delay (s) and samples / frames emitted, audio then video.
  m.buffers = [];
  const buffers = async () => {
    const row = [performance.now(), 0, 0, 0, 0];
    (await mt.pc.getStats()).forEach((r) => {
      if (r.type !== "inbound-rtp") return;
      const k = r.kind === "audio" ? 1 : 3;
      row[k] = r.jitterBufferDelay ?? 0; row[k + 1] = r.jitterBufferEmittedCount ?? 0;
    });
    m.buffers.push(row);
  };
  let ticks = 0;
  tick();
  m.timer = setInterval(() => { if (m.done) return; tick(); if (++ticks %% 5 === 0) buffers().catch(() => {}); }, 100);
  return true;
})()
"""

# The bot's voice heard at or after `since` (page clock): [first, last, now].
BOT_VOICE_SINCE_JS = """
(() => {
  const m = window.__musetalkMeasure;
  const off = m.heard ?? 0;
  let first = null, last = null;
  for (const a of m.audio) if (a[0] + off >= %(since)f && a[3] > %(on)f) { if (first === null) first = a[0] + off; last = a[1] + off; }
  return [first, last, performance.now()];
})()
"""

# Onsets of the microphone's speech (after at least 800 ms of quiet), page clock.
MIC_ONSETS_JS = """
(() => {
  const m = window.__musetalkMeasure, out = [], off = m.heard ?? 0;
  let quietSince = m.audio.length ? m.audio[0][0] : 0, prev = true;
  for (const a of m.audio) {
    const on = a[2] > %(on)f;
    if (on && !prev && a[0] - quietSince >= 800) out.push(a[0] + off);
    if (!on && prev) quietSince = a[0];
    prev = on;
  }
  return out;
})()
"""

COLLECT_JS = (
    "(() => { const m = window.__musetalkMeasure; m.done = true; clearInterval(m.timer); "
    "return {frames: m.frames, audio: m.audio, clock: m.clock, buffers: m.buffers, errors: m.errors}; })()"
)


def start_measuring(page: Page, avatar, box) -> None:
    aw, ah = avatar.size
    cfg = {"crop": CROP, "box": list(box), "videoW": aw, "videoH": ah}
    assert page.evaluate(MEASURE_JS % {"cfg": json.dumps(cfg), "face_frames": FACE_FRAMES_JS}, user_gesture=True)
    # The output clock ties in once the audio device has played a little.
    deadline = time.monotonic() + 5
    while page.evaluate("window.__musetalkMeasure.heard") is None and time.monotonic() < deadline:
        time.sleep(0.1)


def bot_voice_since(page: Page, since: float) -> tuple[float | None, float | None, float]:
    first, last, now = page.evaluate(BOT_VOICE_SINCE_JS % {"since": since, "on": BOT_SOUND})
    return first, last, now


def wait_for_voice(page: Page, since: float, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        first, _, _ = bot_voice_since(page, since)
        if first is not None:
            return first
        time.sleep(0.05)
    return None


def wait_until_said(page: Page, since: float, quiet_ms: float = 1200.0, timeout: float = 20.0) -> None:
    """Until the bot's voice, heard after `since`, has been quiet for `quiet_ms` (page clock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        first, last, now = bot_voice_since(page, since)
        if first is not None and now - last >= quiet_ms:
            return
        time.sleep(0.1)


def wait_page_time(page: Page, until: float) -> None:
    while (left := until - page_now(page)) > 0:
        time.sleep(min(left / 1000, 0.2))


# ------------------------------------------------------------------------------------------ analysis
@dataclass
class Recording:
    """What the page recorded, on the page's clock (ms).

    Video: `shown` (when each presented frame is displayed), `callback` (its requestVideoFrameCallback time, what
    test_bot_browser.py stamps frames with), `mouth` (the mouth's difference to the idle frame the upper face matches
    best), `upper` (that upper-face difference). Audio, per block: `voice_from` / `voice_to` (when the bot's voice
    in it is heard), `mic_at` (when the microphone's block was rendered, about when it was captured), `mic`, `bot`
    (RMS). `rendered_ms`: how long before it is heard the audio is rendered (what test_bot_browser.py's analysers
    see)."""

    shown: np.ndarray
    callback: np.ndarray
    mouth: np.ndarray
    upper: np.ndarray
    voice_from: np.ndarray
    voice_to: np.ndarray
    mic_at: np.ndarray
    mic: np.ndarray
    bot: np.ndarray
    rendered_ms: float
    clock_note: str
    buffers: np.ndarray  # [page time, audio jitter buffer delay (ms), video jitter buffer delay (ms)] every 0.5 s

    def buffered_at(self, time_ms: float) -> tuple[float | None, float | None]:
        """The browser's audio and video jitter buffer delays (ms, mean over the 0.5 s before `time_ms`)."""
        idx = np.searchsorted(self.buffers[:, 0], time_ms) if len(self.buffers) else 0
        if idx >= len(self.buffers):
            return None, None
        audio, video = self.buffers[idx, 1:]
        return (None if np.isnan(audio) else float(audio)), (None if np.isnan(video) else float(video))

    @property
    def sound(self) -> np.ndarray:
        """Blocks in which the bot's voice is not silent (its silence is digital: exactly 0)."""
        return self.bot > BOT_SOUND

    @property
    def loud(self) -> np.ndarray:
        """Blocks in which the bot is speaking (not a quiet tail between words)."""
        return self.bot > max(BOT_VOICE_ON, 0.1 * self.bot.max())


def read_recording(data: dict, avatar, box, video_size) -> Recording:
    assert not data["errors"], data["errors"]
    frames = data["frames"]
    refs = reference_crops(avatar, box, video_size)
    got = np.stack(
        [np.frombuffer(base64.b64decode(f["g"]), np.uint8).reshape(CROP, CROP).astype(np.float32) for f in frames]
    )
    upper = slice(int(0.08 * CROP), int(0.40 * CROP))
    mouth_rows, mouth_cols = slice(int(0.62 * CROP), int(0.92 * CROP)), slice(int(0.25 * CROP), int(0.75 * CROP))
    upper_err = np.abs(got[:, None, upper, :] - refs[None, :, upper, :]).mean(axis=(2, 3))
    best = upper_err.argmin(axis=1)
    mouth_err = np.abs(got[:, mouth_rows, mouth_cols] - refs[best][:, mouth_rows, mouth_cols]).mean(axis=(1, 2))

    audio = np.array(data["audio"])
    clock = np.array(data["clock"])  # [performance.now(), currentTime, output contextTime, its performanceTime]
    valid = clock[:, 3] > 0
    if valid.sum() >= 2:
        ctx, offset = clock[valid, 2], clock[valid, 3] - clock[valid, 2]
        order = np.argsort(ctx)
        ctx, offset = ctx[order], offset[order]
        # The block rendered now (currentTime) is heard this much later.
        rendered_ms = float(np.median(clock[valid, 3] + (clock[valid, 1] - clock[valid, 2]) - clock[valid, 0]))
        note = "audio timed as heard (getOutputTimestamp)"
    else:  # no output clock: the render clock, as test_bot_browser.py's analysers see it
        ctx, offset = np.zeros(1), np.array([np.min(clock[:, 0] - clock[:, 1])])
        rendered_ms = 0.0
        note = "NO output timestamps: audio timed as rendered"

    def heard(context_ms: np.ndarray) -> np.ndarray:
        return context_ms + np.interp(context_ms, ctx, offset)

    raw = np.array(data.get("buffers") or np.zeros((0, 5)), dtype=float).reshape(-1, 5)
    with np.errstate(divide="ignore", invalid="ignore"):
        step = np.diff(raw, axis=0)
        buffers = np.column_stack(
            [raw[1:, 0], 1000 * step[:, 1] / step[:, 2], 1000 * step[:, 3] / step[:, 4]]
        ) if len(raw) >= 2 else np.zeros((0, 3))  # fmt: skip
    return Recording(
        buffers=buffers,
        shown=np.array([f["shown"] for f in frames]),
        callback=np.array([f["t"] for f in frames]),
        mouth=mouth_err,
        upper=upper_err[np.arange(len(got)), best],
        voice_from=heard(audio[:, 0]),
        voice_to=heard(audio[:, 1]),
        mic_at=heard(audio[:, 0]) - rendered_ms,
        mic=audio[:, 2],
        bot=audio[:, 3],
        rendered_ms=rendered_ms,
        clock_note=note,
    )


def moving_mouth(rec: Recording) -> tuple[np.ndarray, dict]:
    """Frames whose mouth differs from every idle frame: the threshold comes from frames shown while the bot had
    been silent for 1.5 s (and stayed silent 0.5 s more), as test_bot_browser.py sets it."""

    def quiet_around(time_ms: float) -> bool:
        sel = (rec.voice_to >= time_ms - 1500) & (rec.voice_from <= time_ms + 500)
        return bool(sel.any()) and not rec.sound[sel].any()

    idle = np.array([quiet_around(x) for x in rec.shown])
    assert idle.sum() >= 20, f"only {idle.sum()} frames were shown in silence: no idle reference"
    idle_mouth = float(np.median(rec.mouth[idle]))
    threshold = max(3 * idle_mouth, idle_mouth + 6.0)
    moving = rec.mouth > threshold
    return moving, {"idle": idle, "idle_mouth": idle_mouth, "threshold": threshold}


def first_at_or_after(times: np.ndarray, flags: np.ndarray, start: float, within_ms: float) -> float | None:
    idx = np.nonzero((times >= start) & (times <= start + within_ms) & flags)[0]
    return float(times[idx[0]]) if len(idx) else None


def silenced(rec: Recording, start: float, quiet_ms: float) -> tuple[float, float | None]:
    """After `start`: when the last sound of the bot's voice before a silence of `quiet_ms` ended (`start` when
    there was none), and when its voice came back after that silence (None: not within the recording)."""
    last = None
    after = rec.voice_to > start
    for begins, ends, sound in zip(rec.voice_from[after], rec.voice_to[after], rec.sound[after]):
        if not sound:
            continue
        if begins - (start if last is None else last) >= quiet_ms:
            return (start if last is None else last), float(begins)
        last = float(ends)
    end = float(rec.voice_to[-1])
    assert end - (start if last is None else last) >= quiet_ms, (
        f"the bot's voice did not stop for {quiet_ms:.0f} ms after {start:.0f} (last heard {fmt(last)}, recording "
        f"ends {end:.0f})"
    )
    return (start if last is None else last), None


def av_offset(rec: Recording, moving: np.ndarray, since: float) -> tuple[float | None, float | None, float | None]:
    """The first voice heard and the first moving mouth shown at or after `since`, and the A/V offset between them
    (mouth - voice: + = video later, as test_bot_browser.py counts it), as displayed and heard."""
    voice = first_at_or_after(rec.voice_from, rec.sound, since, 10000)
    mouth = first_at_or_after(rec.shown, moving, since, 10000)
    return voice, mouth, (mouth - voice if voice is not None and mouth is not None else None)


def page_stamped_av(rec: Recording, moving: np.ndarray, since: float) -> float | None:
    """The same offset stamped as test_bot_browser.py does: frame callback time - time the audio was rendered."""
    voice = first_at_or_after(rec.voice_from, rec.sound, since, 10000)
    idx = np.nonzero((rec.shown >= since) & moving)[0]
    return None if voice is None or not len(idx) else float(rec.callback[idx[0]] - (voice - rec.rendered_ms))


def voice_gaps(rec: Recording, start: float, end: float, min_ms: float = 100.0) -> list[float]:
    """The silences of at least `min_ms` within the bot's voice heard between `start` and `end` (ms each)."""
    gaps, silent_since = [], None
    sel = (rec.voice_from >= start) & (rec.voice_to <= end)
    for begins, sound in zip(rec.voice_from[sel], rec.sound[sel]):
        if not sound and silent_since is None:
            silent_since = begins
        elif sound and silent_since is not None:
            if begins - silent_since >= min_ms:
                gaps.append(float(begins - silent_since))
            silent_since = None
    return gaps


def longest_run(flags: np.ndarray) -> int:
    best = run = 0
    for f in flags:
        run = run + 1 if f else 0
        best = max(best, run)
    return best


def keep_recording(folder: Path, data: dict, **extra) -> None:
    """What the page recorded (and the marks), left in the test's tmp folder for a closer look."""
    (folder / "recording.json").write_text(json.dumps({**data, **extra}))


def stray_turns(turns: list[dict]) -> str:
    """A note on avatar turns with nothing said that were not cut off. Seen now and then after a barge-in: a frame
    the avatar pushes after the interruption opens a new turn (musetalk/bot/transcript.py); a product issue,
    printed, not asserted here."""
    stray = [x["at_s"] for x in turns if x["role"] == "avatar" and x["text"] == "\u2026" and not x["interrupted"]]
    return f"\nNOTE: empty avatar turns not marked interrupted at {stray} s" if stray else ""


def buffers(rec: Recording, time_ms: float | None) -> str:
    audio, video = rec.buffered_at(time_ms) if time_ms is not None else (None, None)
    return f"{fmt(audio)}/{fmt(video)}"


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def check_cli_stopped(cli: subprocess.Popen, log_path: Path) -> str:
    output = log_path.read_text()
    assert cli.returncode == 0, output[-3000:]
    assert "Stopped cleanly" in output, output[-3000:]
    assert re.search(r"viewer \S+ connected", output), output[-3000:]
    return output


# ------------------------------------------------------------------------------------------ say mode
def test_say_interrupt_and_say_again_at_the_browser(cli_env, prepared_avatar, tmp_path):
    began = time.monotonic()
    quiet = media.silence_wav(tmp_path / "quiet.wav", seconds=2.0)
    bot_config = tmp_path / "say.yaml"
    bot_config.write_text("tts: {service: espeak, voice: en-us}\n")
    log_path = tmp_path / "cli.log"
    port = 7863
    url = f"http://{SERVER_ADDRESS}:{port}/?key={PAGE_KEY}"  # beyond loopback: the page's key
    marks: dict[str, tuple[float, float]] = {}

    with (
        PrivateNetwork() as net,
        cli_bot(net, cli_env, port=port, mode="say", bot_config=bot_config,
                config=avatar_config(tmp_path, prepared_avatar.name), log_path=log_path) as cli,
    ):  # fmt: skip
        ready_s = time.monotonic() - began
        with Chromium(fake_audio=quiet, wrap=net.wrap, extra_flags=insecure_origin_flags(port)) as browser:
            page, video_size = open_viewer(browser, url, log_path)
            box = face_box(prepared_avatar)
            start_measuring(page, prepared_avatar, box)
            time.sleep(IDLE_BEFORE_S)  # idle frames: the reference for a still mouth

            marks["say 1"] = type_line(page, cli, LONG_LINE)
            voice = wait_for_voice(page, marks["say 1"][0], timeout=10)
            assert voice is not None, f"no voice at the browser 10 s after the line was typed\n{log_path.read_text()[-3000:]}"  # fmt: skip
            wait_page_time(page, voice + SPEECH_BEFORE_STOP_MS)
            while_speaking = bot_status_of(page)
            marks["stop"] = type_line(page, cli, "/stop")
            time.sleep(QUIET_AFTER_STOP_S)
            after_stop = bot_status_of(page)

            for n, line in enumerate(SHORT_LINES, start=2):
                marks[f"say {n}"] = type_line(page, cli, line)
                assert wait_for_voice(page, marks[f"say {n}"][0], timeout=10) is not None, f"say {n}: no voice"
                wait_until_said(page, marks[f"say {n}"][0])
            data = page.evaluate(COLLECT_JS, timeout=60)
            final = bot_status_of(page)
    output = check_cli_stopped(cli, log_path)
    total_s = time.monotonic() - began
    keep_recording(tmp_path, data, marks=marks, final=final)

    rec = read_recording(data, prepared_avatar, box, video_size)
    moving, judge = moving_mouth(rec)
    # Each line typed: its first sound heard and its first moving mouth shown.
    says = {name: av_offset(rec, moving, marks[name][0]) for name in marks if name.startswith("say")}
    av = [offset for _, _, offset in says.values() if offset is not None]
    av_median = float(np.median(av)) if av else None
    stamped = [page_stamped_av(rec, moving, marks[name][0]) for name in says]

    # The interruption: the end of the last sound after "/stop" (before 1 s of silence), the mouth from then on.
    stop = marks["stop"][0]
    was_speaking = bool(rec.loud[(rec.voice_to >= stop - 1000) & (rec.voice_from <= stop)].any())
    last_sound, back_at = silenced(rec, stop, quiet_ms=1000)
    voice_1 = says["say 1"][0]
    # from the deadline on (video may trail its audio by AV_MAX_MS) until say 2 is typed
    after = (rec.shown >= stop + STOP_TO_SILENCE_MAX_MS + AV_MAX_MS) & (rec.shown < marks["say 2"][0])
    speech_1 = (rec.shown >= (voice_1 or np.inf)) & (rec.shown <= stop)
    turns = final.get("transcript") or []

    print(
        "\n=== say mode at the browser (CLI --mode say, headless Chromium, private netns) ===\n"
        f"CLI ready after {ready_s:.1f} s; test {total_s:.1f} s; {len(rec.shown)} frames shown; {rec.clock_note} "
        f"(rendered {rec.rendered_ms:.0f} ms before); model {final.get('model_ms_per_frame')} ms/frame\n"
        + "".join(
            f"{name}: typed (mark +-{marks[name][1] - marks[name][0]:.0f} ms) -> first sound heard "
            f"{fmt(v - marks[name][0] if v is not None else None)}, first moving mouth shown "
            f"{fmt(m - marks[name][0] if m is not None else None)}: A/V {fmt(o)} (page-stamped as test_bot_browser.py: "
            f"{fmt(st)}; jitter buffers audio/video {buffers(rec, v)})\n"
            for (name, (v, m, o)), st in zip(says.items(), stamped)
        )
        + f"A/V offset (mouth shown - voice heard; + = video later) median {fmt(av_median)} over {len(av)} onsets "
        f"{np.round(av).tolist()}\n"
        f"silences >= 100 ms in the voice heard before /stop: {np.round(voice_gaps(rec, voice_1 or stop, stop)).tolist()} "
        f"ms (espeak's own audio of these words has none but its pauses at punctuation)\n"
        f"/stop typed {fmt(stop - voice_1 if voice_1 else None)} into the speech: its last sound ends "
        f"{fmt(last_sound - stop)} after it; the voice is back {fmt(back_at - stop if back_at else None)} after it "
        f"(say 2 typed at {fmt(marks['say 2'][0] - stop)})\n"
        f"moving-mouth frames: {moving[speech_1].sum()}/{speech_1.sum()} during say 1, {moving[after].sum()}/"
        f"{after.sum()} after the stop (longest run {longest_run(moving[after])}), {moving[judge['idle']].mean():.0%} "
        f"of idle frames; mouth residual idle p50 {judge['idle_mouth']:.1f}, threshold {judge['threshold']:.1f}; "
        f"upper face p50 {np.median(rec.upper):.1f}\n"
        f"status before /stop: speaking={while_speaking.get('speaking')} first_mouth_ms="
        f"{while_speaking.get('first_mouth_ms')}; after: speaking={after_stop.get('speaking')}; at the end: "
        f"first_mouth_ms={final.get('first_mouth_ms')} p95={final.get('first_mouth_p95_ms')} fps={final.get('fps')}\n"
        f"transcript: {[(x['role'], x['text'][:40], x['interrupted']) for x in turns]}{stray_turns(turns)}"
    )

    for name, (voice_at, mouth_at, _) in says.items():
        assert voice_at is not None, f"{name}: the bot's voice never reached the browser"
        assert voice_at - marks[name][0] <= SAY_TO_VOICE_MAX_MS, f"{name}: first sound {voice_at - marks[name][0]:.0f} ms after the line"  # fmt: skip
        assert mouth_at is not None, f"{name}: no moving mouth at the browser"
    assert moving[speech_1].sum() >= 3, "the mouth hardly moved while the avatar spoke"
    assert av_median is not None and AV_MIN_MS <= av_median <= AV_MAX_MS, f"A/V offsets {av} (median {av_median})"
    assert was_speaking, "the avatar was not speaking when /stop was typed"
    assert last_sound - stop <= STOP_TO_SILENCE_MAX_MS, f"the voice went on {last_sound - stop:.0f} ms after /stop"
    assert back_at is not None and back_at >= marks["say 2"][0], "after /stop the voice came back before say 2"
    assert after.sum() >= 20, f"only {after.sum()} frames between the stop and say 2"
    assert moving[after].mean() < 0.1 and longest_run(moving[after]) < 3, "the mouth still moves after /stop"
    assert np.median(rec.upper[judge["idle"]]) < 12, "the idle video does not match the avatar's frames"
    assert while_speaking.get("speaking") and not after_stop.get("speaking"), (while_speaking, after_stop)
    assert any(x["role"] == "avatar" and x["interrupted"] for x in turns), turns
    assert "end of it" not in " ".join(x["text"] for x in turns), "the rest of the long line was said"
    assert "Type a line" in output, output[-2000:]


# ------------------------------------------------------------------------------------------ conversation
def conversation_microphone(folder: Path) -> tuple[Path, float, float]:
    """Silence, the question, silence while the avatar answers, the barge-in, silence (Chromium loops it).

    Returns (the WAV, the question's length, the barge-in's length) in seconds."""
    question = media.speech_wav(folder / "question.wav", QUESTION)
    barge_in = media.speech_wav(folder / "barge-in.wav", "Wait, stop please.")
    pcm = []
    for path in (question, barge_in):
        with wave.open(str(path)) as wf:
            assert wf.getframerate() == 16000
            pcm.append(np.frombuffer(wf.readframes(wf.getnframes()), np.int16))
    rate = 16000
    audio = np.concatenate(
        [np.zeros(int(MIC_LEAD_S * rate), np.int16), pcm[0], np.zeros(int(MIC_GAP_S * rate), np.int16), pcm[1]]
    )
    audio = np.concatenate([audio, np.zeros(max(0, int(MIC_TOTAL_S * rate) - len(audio)), np.int16)])
    out = folder / "microphone.wav"
    with wave.open(str(out), "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(rate)
        wf.writeframes(audio.tobytes())
    return out, len(pcm[0]) / rate, len(pcm[1]) / rate


@contextlib.contextmanager
def standin_process(net: PrivateNetwork, folder: Path):
    """tests/openai_standin.py served by a process of its own inside the namespace; yields (its port, its log)."""
    script = folder / "standin.py"
    script.write_text(STANDIN_SCRIPT)
    cfg = folder / "standin.json"
    cfg.write_text(json.dumps({
        "heard": [QUESTION, BARGE_IN],
        # The barge-in's answer comes slowly, so that the voice stopping is not confused with the next answer.
        "replies": [[QUESTION, LONG_REPLY, 0.0], [BARGE_IN, SHORT_REPLY, SLOW_SECOND_ANSWER_S]],
    }))  # fmt: skip
    log_path = folder / "standin.log"
    with open(log_path, "w") as log:
        proc = net.popen(
            [sys.executable, str(script), str(TESTS), str(cfg)], cwd=folder, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not (found := re.search(r"^PORT (\d+)$", log_path.read_text(), re.M)) and time.monotonic() < deadline:
                assert proc.poll() is None, f"the stand-in exited:\n{log_path.read_text()}"
                time.sleep(0.1)
            assert found, log_path.read_text()
            yield int(found.group(1)), log_path
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def test_a_conversation_with_barge_in_at_the_browser(cli_env, prepared_avatar, tmp_path):
    began = time.monotonic()
    mic_wav, question_s, barge_in_s = conversation_microphone(tmp_path)
    log_path = tmp_path / "cli.log"
    port = 7864
    url = f"http://{SERVER_ADDRESS}:{port}/?key={PAGE_KEY}"  # beyond loopback: the page's key

    with PrivateNetwork() as net, standin_process(net, tmp_path) as (api_port, standin_log):
        base_url = f"http://127.0.0.1:{api_port}/v1"
        bot_config = tmp_path / "conversation.yaml"
        bot_config.write_text(
            "system_prompt: You are Astro, a friendly astronaut.\n"
            f"stt: {{service: openai, base_url: '{base_url}', model: whisper-1}}\n"
            f"llm: {{service: openai, base_url: '{base_url}', model: gpt-4o-mini}}\n"
            "tts: {service: espeak, voice: en-us}\n"
        )
        with cli_bot(net, cli_env, port=port, mode="conversation", bot_config=bot_config,
                     config=avatar_config(tmp_path, prepared_avatar.name), log_path=log_path) as cli:  # fmt: skip
            ready_s = time.monotonic() - began
            with Chromium(fake_audio=mic_wav, wrap=net.wrap, extra_flags=insecure_origin_flags(port)) as browser:
                page, video_size = open_viewer(browser, url, log_path)
                box = face_box(prepared_avatar)
                start_measuring(page, prepared_avatar, box)
                # The question, the answer, the barge-in (the second utterance heard at the microphone)...
                deadline = time.monotonic() + MIC_TOTAL_S
                while len(mic := page.evaluate(MIC_ONSETS_JS % {"on": MIC_ON})) < 2 and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert len(mic) >= 2, f"the microphone's two utterances were not heard in the page: onsets {mic}"
                # ... and the answer to the barge-in, heard to its end. On a device slower than real time it starts
                # up to the latency budget later (once its frames will be in time): wait for it, not a fixed time.
                answer_from = mic[1] + 1000 * (barge_in_s + SLOW_SECOND_ANSWER_S)
                wait_page_time(page, answer_from + 3500)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not any(
                    SHORT_REPLY in x["text"] for x in bot_status_of(page).get("transcript") or []
                ):
                    time.sleep(0.2)
                wait_until_said(page, answer_from)
                data = page.evaluate(COLLECT_JS, timeout=60)
                final = bot_status_of(page)
        output = check_cli_stopped(cli, log_path)
    total_s = time.monotonic() - began
    standin = standin_log.read_text()
    keep_recording(tmp_path, data, final=final)

    rec = read_recording(data, prepared_avatar, box, video_size)
    mic_on = rec.mic > max(MIC_ON, 0.1 * rec.mic.max())
    mic_onsets = onsets(rec.mic_at, mic_on)
    assert len(mic_onsets) >= 2, f"the microphone's two utterances are not in the recording: {mic_onsets}"
    question_at, barge_in_at = mic_onsets[:2]
    spacing_s = (barge_in_at - question_at) / 1000
    assert abs(spacing_s - (question_s + MIC_GAP_S)) < 0.6, (
        f"the first two utterances heard are {spacing_s:.1f} s apart, not the question and the barge-in "
        f"({question_s + MIC_GAP_S:.1f} s): the page started measuring too late?"
    )
    heard = np.nonzero(mic_on & (rec.mic_at >= question_at) & (rec.mic_at < barge_in_at))[0]
    question_end = float(rec.mic_at[heard[-1]]) + float(rec.voice_to[0] - rec.voice_from[0])
    moving, judge = moving_mouth(rec)
    reply_at, reply_mouth, reply_av = av_offset(rec, moving, question_at)
    was_speaking = bool(rec.loud[(rec.voice_to >= barge_in_at - 1000) & (rec.voice_from <= barge_in_at)].any())
    last_sound, back_at = silenced(rec, barge_in_at, quiet_ms=1200)
    answering = (rec.shown >= (reply_at or np.inf)) & (rec.shown <= barge_in_at)
    # From the silence on, until the answer to the barge-in can exist (the user's words, then the slow LLM).
    answer_possible = barge_in_at + 1000 * (barge_in_s + SLOW_SECOND_ANSWER_S)
    after = (rec.shown >= last_sound + AV_MAX_MS) & (rec.shown < answer_possible)
    answer_at, answer_mouth, answer_av = av_offset(rec, moving, answer_possible)
    turns = final.get("transcript") or []
    said = [line for line in standin.splitlines() if line.startswith(("CHAT", "TRANSCRIBED"))]

    print(
        "\n=== conversation at the browser (CLI --mode conversation, stand-in STT + LLM, espeak, private netns) ===\n"
        f"CLI ready after {ready_s:.1f} s; test {total_s:.1f} s; {len(rec.shown)} frames shown; {rec.clock_note}\n"
        f"question at the mic ({question_s:.1f} s): its end -> first reply sound heard "
        f"{fmt(reply_at - question_end if reply_at else None)} (the bot's own turn latency "
        f"{[x.get('latency_ms') for x in turns if x['role'] == 'avatar']} per reply); first moving mouth "
        f"{fmt(reply_mouth - question_end if reply_mouth else None)}; A/V at the reply's onset {fmt(reply_av)} "
        f"(jitter buffers audio/video {buffers(rec, reply_at)}); "
        f"silences >= 100 ms in the reply heard before the barge-in: "
        f"{np.round(voice_gaps(rec, reply_at or barge_in_at, barge_in_at)).tolist()} ms\n"
        f"barge-in: the user speaks again {fmt(barge_in_at - reply_at if reply_at else None)} into the reply; the "
        f"reply's last sound ends {fmt(last_sound - barge_in_at)} after the user's onset; the answer to the "
        f"barge-in is heard {fmt(back_at - barge_in_at if back_at else None)} after it, A/V at its onset "
        f"{fmt(answer_av)} (jitter buffers audio/video {buffers(rec, answer_at)})\n"
        f"moving-mouth frames: {moving[answering].sum()}/{answering.sum()} while answering, {moving[after].sum()}/"
        f"{after.sum()} once silenced; threshold {judge['threshold']:.1f}\n"
        f"transcript: {[(x['role'], x['text'][:40], x['interrupted']) for x in turns]}{stray_turns(turns)}\n"
        f"stand-in: {' | '.join(said)}"
    )

    assert reply_at is not None and reply_at < barge_in_at, f"no reply was heard before the barge-in\n{standin}\n{output[-3000:]}"  # fmt: skip
    assert reply_at > question_end, "the reply started before the user had finished"
    assert moving[answering].sum() >= 3, "the mouth hardly moved while the avatar answered"
    assert was_speaking, "the avatar was not speaking when the user spoke again"
    assert last_sound - barge_in_at <= BARGE_IN_TO_SILENCE_MAX_MS, f"the reply went on {last_sound - barge_in_at:.0f} ms into the barge-in"  # fmt: skip
    assert moving[after].mean() < 0.1 and longest_run(moving[after]) < 3, "the mouth moves after the barge-in"
    users = [x for x in turns if x["role"] == "user"]
    assert users and users[0]["text"].strip() == QUESTION, turns
    assert any(x["role"] == "avatar" and x["interrupted"] for x in turns), turns
    assert "twice a day" not in " ".join(x["text"] for x in turns), "the end of the cut-off reply is in the transcript"
    assert back_at is not None and any(SHORT_REPLY in x["text"] for x in turns), "no answer to the barge-in"


def onsets(times: np.ndarray, loud: np.ndarray, min_quiet_ms: float = 800.0) -> list[float]:
    """Times where `loud` turns on after at least `min_quiet_ms` of quiet (a start mid-speech is not one)."""
    found, quiet_since, prev = [], float(times[0]) if len(times) else 0.0, True
    for t, on in zip(times, loud):
        if on and not prev and t - quiet_since >= min_quiet_ms:
            found.append(float(t))
        if not on and prev:
            quiet_since = float(t)
        prev = bool(on)
    return found
