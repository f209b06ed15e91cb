"""End to end: examples/conversation_bot.py, run as its README says, greets a real WebRTC client.

Inside a private network namespace (tests/netns.py: aioice ignores loopback) this test runs
* the OpenAI stand-in (tests/openai_standin.py) as the example's LLM and STT, on 127.0.0.1 there
  (this file run as `standin`; it prints READY and, when its stdin closes, the chat requests);
* the example itself, unchanged, under Pipecat's development runner (`-t webrtc --host 10.200.0.1`),
  with the tiny models and the prepared astronaut avatar;
* an aiortc client (this file run as `client`) that POSTs its offer to the runner's /api/offer,
  sends a silent microphone, records the bot's audio and video for CLIENT_SECONDS and prints a
  JSON summary.

Asserted: the LLM was asked with the example's system prompt and its greeting request; the
client got >= 50 avatar-sized video frames and some non-silent audio (the greeting, spoken by
espeak-ng and lip-synced by MuseTalk); the example ends cleanly on SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import SERVER_ADDRESS, PrivateNetwork, unavailable_reason

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "conversation_bot.py"
PORT = 7860
CLIENT_SECONDS = 15.0
GREETING = "Hello there! Welcome, it is lovely to meet you."
LOUD = 1000  # int16 peak above which a received audio frame counts as sound, not silence


def skip_reason() -> str | None:
    if shutil.which("espeak-ng") is None and shutil.which("espeak") is None:
        return "espeak-ng is not installed (the example's voice; test.sh installs it)"
    return unavailable_reason()


_SKIP_REASON = skip_reason() if __name__ != "__main__" else None
pytestmark = pytest.mark.skipif(_SKIP_REASON is not None, reason=str(_SKIP_REASON))


def example_constants() -> dict[str, str]:
    """The example's string constants (SYSTEM_PROMPT, GREETING_REQUEST), read from its source."""
    import ast

    tree = ast.parse(EXAMPLE.read_text())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node.value.value
    return found


def wait_for_line(path: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert process.poll() is None, f"exited with {process.returncode} before {text!r}:\n{path.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout:.0f} s:\n{path.read_text()}"
        time.sleep(0.2)


def stop(process: subprocess.Popen, sig: int, timeout: float) -> int | None:
    """Send sig and wait; None (and a kill) when it did not end in time."""
    if process.poll() is not None:
        return process.returncode
    process.send_signal(sig)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        return None


@pytest.mark.slow
def test_conversation_bot_example_greets_a_webrtc_client(tmp_path, tiny_models_dir, avatar_store, prepared_avatar):
    constants = example_constants()
    started = time.monotonic()
    requests_path, bot_log = tmp_path / "chat_requests.json", tmp_path / "example.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with PrivateNetwork() as net:
        standin = net.popen(
            [sys.executable, __file__, "standin", str(requests_path)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        bot = None
        try:
            ready = standin.stdout.readline().split()
            assert ready[:1] == ["READY"], f"the stand-in did not start: {ready}"
            api = f"http://127.0.0.1:{ready[1]}/v1"
            bot_env = {
                **env,
                "MUSETALK_AVATAR": "astro",
                "MUSETALK_MODELS_DIR": str(tiny_models_dir),
                "MUSETALK_AVATARS_DIR": str(avatar_store.root),
                "MUSETALK_DEVICE": "cpu",
                "LLM_BASE_URL": api,
                "LLM_MODEL": "gpt-4o-mini",
                "LLM_API_KEY": "sk-llm",
                "STT_BASE_URL": api,
                "STT_API_KEY": "sk-stt",
            }
            with open(bot_log, "w") as log:
                bot = net.popen(
                    [sys.executable, str(EXAMPLE), "-t", "webrtc", "--host", SERVER_ADDRESS, "--port", str(PORT)],
                    cwd=tmp_path, env=bot_env, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            wait_for_line(bot_log, "Uvicorn running on", bot, timeout=60)
            served_s = time.monotonic() - started

            client = subprocess.run(
                net.wrap([sys.executable, __file__, "client", f"http://{SERVER_ADDRESS}:{PORT}/api/offer", str(CLIENT_SECONDS)]),
                env=env, capture_output=True, text=True, timeout=CLIENT_SECONDS + 60,
            )  # fmt: skip
            assert client.returncode == 0, (
                f"client failed:\n{client.stderr[-4000:]}\nexample:\n{bot_log.read_text()[-4000:]}"
            )
            summary = json.loads(client.stdout.strip().splitlines()[-1])
            # Pipecat's runner waits for running bot sessions on Ctrl+C (a second one force-quits): stop it once the
            # visitor has left, as a developer would after closing the page.
            wait_for_line(bot_log, "finished running", bot, timeout=15)
            stopping = time.monotonic()
            bot_rc = stop(bot, signal.SIGINT, timeout=30)
            stop_s = time.monotonic() - stopping
        finally:
            if bot is not None and bot.poll() is None:
                bot.kill()
            standin.stdin.close()
            standin.wait(timeout=15)
    log_text = bot_log.read_text()
    chats = json.loads(requests_path.read_text())
    print(f"\nexample: page served {served_s:.1f} s after start; {len(chats)} chat request(s) to the stand-in")
    print(f"client summary: {json.dumps(summary)}")
    print(f"example: exit code {bot_rc} {stop_s:.1f} s after SIGINT; test took {time.monotonic() - started:.1f} s")

    assert chats, f"the example never asked the LLM:\n{log_text[-4000:]}"
    messages = chats[0]["messages"]
    assert {"role": "system", "content": constants["SYSTEM_PROMPT"]} in messages, messages
    assert {"role": "user", "content": constants["GREETING_REQUEST"]} in messages, messages

    width, height = prepared_avatar.size
    assert summary["video_frames"] >= 50, summary
    assert summary["video_sizes"] == {f"{width}x{height}": summary["video_frames"]}, summary
    assert summary["loud_audio_s"] >= 0.5, f"{summary}\n{log_text[-4000:]}"
    assert bot_rc == 0, f"the example did not end cleanly on SIGINT (rc {bot_rc}):\n{log_text[-4000:]}"
    assert "Traceback" not in log_text, log_text[-6000:]


# ---------------------------------------------------------------------------------------- in the namespace
def serve_standin(requests_path: str) -> int:
    """The OpenAI stand-in on 127.0.0.1 (in the namespace) until stdin closes; then its chat requests."""
    from openai_standin import OpenAIStandIn

    with OpenAIStandIn(reply=lambda _messages: GREETING) as api:
        print("READY", api.port, flush=True)
        sys.stdin.read()
        Path(requests_path).write_text(json.dumps([r.json for r in api.chat_requests()]))
    return 0


async def run_client(offer_url: str, seconds: float) -> dict:
    """A WebRTC visitor: silent microphone out, the bot's audio and video in; a summary of what came."""
    import aiohttp
    import numpy as np
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack, MediaStreamError

    pc = RTCPeerConnection()
    pc.addTrack(AudioStreamTrack())  # silence, paced in real time
    pc.addTransceiver("video", direction="recvonly")
    t0 = time.monotonic()
    stats = {"video_frames": 0, "video_sizes": {}, "audio_s": 0.0, "loud_audio_s": 0.0}
    firsts: dict[str, float] = {}

    async def consume(track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                firsts.setdefault("first_video_s", time.monotonic() - t0)
                size = f"{frame.width}x{frame.height}"
                stats["video_frames"] += 1
                stats["video_sizes"][size] = stats["video_sizes"].get(size, 0) + 1
            else:
                seconds_here = frame.samples / frame.sample_rate
                stats["audio_s"] += seconds_here
                if np.abs(frame.to_ndarray().astype(np.int32)).max() > LOUD:
                    firsts.setdefault("first_loud_audio_s", time.monotonic() - t0)
                    stats["loud_audio_s"] += seconds_here

    consumers = []
    pc.on("track", lambda track: consumers.append(asyncio.ensure_future(consume(track))))
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        offer = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
        async with http.post(offer_url, json=offer) as response:
            response.raise_for_status()
            answer = await response.json()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    await asyncio.sleep(seconds)
    state = pc.connectionState
    await pc.close()
    await asyncio.gather(*consumers, return_exceptions=True)
    return {**stats, **firsts, "pc_id": answer.get("pc_id"), "connection_state": state}


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "standin":
    sys.exit(serve_standin(sys.argv[2]))
if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "client":
    print(json.dumps(asyncio.run(run_client(sys.argv[2], float(sys.argv[3])))), flush=True)
