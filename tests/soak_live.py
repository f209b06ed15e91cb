"""A long live session, measured: one viewer speaking to the seed CLI's local page for N minutes.

    sudo python tests/soak_live.py --minutes 60            # tiny models (CPU); prints the curve
    sudo python tests/soak_live.py --minutes 60 --models models --avatar NAME   # real weights, a prepared avatar

What it does: builds tiny models and prepares the astronaut avatar (unless given real ones), starts
`start_pipecat_server.py --local` inside a private network namespace (WebRTC needs a non-loopback
address; root only), opens the page in headless Chromium with a fake microphone that loops
espeak-ng speech, and every `--every` seconds prints the viewer's received fps (the bot's
per-viewer status: frames its video track actually sent) and the bot process's RSS. It passes
(exit 0) when every sample after the first minute is >= 20 fps and the RSS stays within 50 MB of
its 5-minute mark (or of its first sample, for runs shorter than 10 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path[:0] = [str(TESTS), str(REPO)]

MIN_FPS = 20.0
RSS_SLACK_MB = 50.0
PAGE_KEY = "soak-page-key"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prepare(work: Path, models: Path | None, avatar: str | None) -> tuple[Path, Path, str]:
    """(models dir, avatars dir, avatar name): the given ones, or tiny models and the astronaut prepared now."""
    import media

    from musetalk.avatar.prepare import prepare_avatar
    from musetalk.avatar.store import AvatarStore
    from musetalk.config import ModelPaths, RuntimeSettings
    from musetalk.models import load_models
    from musetalk.testing import write_tiny_models

    avatars = Path(os.environ.get("MUSETALK_AVATARS_DIR", work / "avatars"))
    if models is not None and avatar is not None:
        return models, avatars, avatar
    models = work / "models"
    write_tiny_models(models, REPO / "models" / "face-landmarks")
    loaded = load_models(ModelPaths(models), RuntimeSettings(device="cpu"))
    video = media.astronaut_video(work / "astronaut.mp4", seconds=2.0)
    prepare_avatar(loaded, AvatarStore(work / "avatars"), video, "astro")
    return models, work / "avatars", "astro"


def microphone(work: Path) -> Path:
    """Speech, then silence, as a WAV Chromium loops (the viewer talks about half of the time)."""
    import wave

    import media
    import numpy as np

    speech = media.speech_wav(work / "speech.wav", "Hello. This is a long session. I keep talking to the avatar.")
    with wave.open(str(speech)) as wf:
        rate, pcm = wf.getframerate(), np.frombuffer(wf.readframes(wf.getnframes()), dtype=np.int16)
    out = work / "mic.wav"
    with wave.open(str(out), "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(rate)
        wf.writeframes(np.concatenate([pcm, np.zeros(len(pcm), np.int16)]).tobytes())
    return out


@contextlib.contextmanager
def seed_cli(net, env: dict, config: Path, port: int, log: Path):
    from netns import SERVER_ADDRESS

    args = [sys.executable, str(REPO / "start_pipecat_server.py"), "--local", "--host", SERVER_ADDRESS,
            "--port", str(port), "--config", str(config), "--skip-checks", "--page-key", PAGE_KEY]  # fmt: skip
    with open(log, "w") as out:
        proc = net.popen(args, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while "Local page:" not in log.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the bot did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
            yield proc
        finally:
            proc.send_signal(2)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def bot_pid(cli_pid: int) -> int:
    """The CLI runs inside `nsenter`: the Python process is its child."""
    children = Path(f"/proc/{cli_pid}/task/{cli_pid}/children")
    kids = children.read_text().split() if children.exists() else []
    return int(kids[0]) if kids else cli_pid


def soak(minutes: float, every_s: float, models: Path | None, avatar: str | None) -> int:
    from browser import Chromium
    from helpers import write_config
    from netns import SERVER_ADDRESS, PrivateNetwork
    from viewers import bot_status_of, insecure_origin_flags, open_viewer

    with tempfile.TemporaryDirectory(prefix="musetalk-soak-") as tmp:
        work = Path(tmp)
        models_dir, avatars_dir, name = prepare(work, models, avatar)
        config = write_config(work / "realtime.yaml", name, preparation=False)
        env = {**os.environ, "MUSETALK_MODELS_DIR": str(models_dir), "MUSETALK_AVATARS_DIR": str(avatars_dir),
               "PYTHONUNBUFFERED": "1"}  # fmt: skip
        port, log = 7861, work / "bot.log"
        url = f"http://{SERVER_ADDRESS}:{port}/?key={PAGE_KEY}"
        curve: list[tuple[float, float | None, float]] = []
        with PrivateNetwork(lifetime_s=int(minutes * 60) + 600) as net, seed_cli(net, env, config, port, log) as cli:
            pid = bot_pid(cli.pid)
            flags = insecure_origin_flags(port)
            with Chromium(fake_audio=microphone(work), wrap=net.wrap, extra_flags=flags) as browser:
                page, _ = open_viewer(browser, url, log)
                start = time.monotonic()
                while (elapsed := time.monotonic() - start) < minutes * 60:
                    time.sleep(min(every_s, max(0.0, minutes * 60 - elapsed)))
                    status = bot_status_of(page)
                    fps = (status.get("viewer_stats") or [{}])[0].get("fps")
                    curve.append(((time.monotonic() - start) / 60, fps, rss_mb(pid)))
                    print(f"{curve[-1][0]:6.1f} min  {fps if fps is not None else '-':>5} fps  "
                          f"{curve[-1][2]:7.0f} MB", flush=True)  # fmt: skip
        return verdict(curve)


def verdict(curve: list[tuple[float, float | None, float]]) -> int:
    settled = [(t, fps, rss) for t, fps, rss in curve if t >= 1.0]
    if not settled:
        print("too short to judge")
        return 1
    slow = [(round(t, 1), fps) for t, fps, _ in settled if fps is None or fps < MIN_FPS]
    mark_t = 5.0 if curve[-1][0] >= 10 else settled[0][0]
    mark = next(rss for t, _, rss in settled if t >= mark_t)
    grown = max(rss for t, _, rss in settled if t >= mark_t) - mark
    print(
        f"fps >= {MIN_FPS:.0f} throughout: {not slow} {slow[:5]}; RSS {grown:+.0f} MB after the {mark_t:.0f}-min mark"
    )
    return 0 if not slow and grown <= RSS_SLACK_MB else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--every", type=float, default=60.0, help="seconds between samples (default 60)")
    parser.add_argument("--models", type=Path, default=None, help="real weights (default: tiny random models)")
    parser.add_argument("--avatar", default=None, help="a prepared avatar in MUSETALK_AVATARS_DIR (with --models)")
    args = parser.parse_args()
    return soak(args.minutes, args.every, args.models, args.avatar)


if __name__ == "__main__":
    sys.exit(main())
