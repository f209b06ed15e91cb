"""Viewers of a bot for tests: a media-less WebRTC offer, and a headless Chromium on the bot's local page.

`candidate_free_offer()` starts a viewer pipeline without any media (no ICE candidates). The rest is
for the browser tests (test_bot_browser.py, test_bot_speech_browser.py): open the local page in
Chromium (tests/browser.py) inside a private network namespace (tests/netns.py), and compare the
face the browser shows with the avatar's own frames (64x64 grey crops of one face box).
"""

from __future__ import annotations

import asyncio
import time

import cv2
import numpy as np
from browser import Chromium, Page, find_chromium
from netns import SERVER_ADDRESS, unavailable_reason

CROP = 64  # the face crop is sampled at CROP x CROP grey pixels
# On a 2-core CPU (Chromium and the bot share it) the tiny models take ~100-250 ms a frame.
# With the product's default 0.2 s budget every speech frame is then late and shown idle, by
# design; a 2 s budget lets the slow device finish some of them, so the lip-sync is visible.
LATENCY_BUDGET_S = 2.0
# The bots of the browser tests serve 10.200.0.1, beyond loopback, where a page always has a viewer key.
PAGE_KEY = "browser-tests-page-key"


# A candidate-free viewer never connects, so the page gives its session back after the bot's connect timeout
# (TransportSettings.connect_timeout_s, 10 s): tests that need one for longer start their bot with this one.
MEDIA_LESS_CONNECT_TIMEOUT_S = 600.0


def media_less_page():
    """A bot's local page (any free port) whose candidate-free viewers keep their sessions for 10 minutes."""
    from musetalk.bot.transports import TransportSettings

    return TransportSettings(kind="local", port=0, connect_timeout_s=MEDIA_LESS_CONNECT_TIMEOUT_S)


def candidate_free_offer() -> str:
    """A real WebRTC offer (aiortc; audio sendrecv, then video recvonly) with its ICE candidates
    removed: the bot answers and starts a viewer pipeline, but no packet ever leaves this
    process (no remote candidates, no STUN servers). Media flow is test_bot_browser.py's job.
    Such a viewer never connects: its pipeline lives for the bot's connect timeout (see above)."""
    from aiortc import RTCPeerConnection

    async def make() -> str:
        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="sendrecv")
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    sdp = asyncio.run(make())
    return "".join(
        line for line in sdp.splitlines(keepends=True) if not line.startswith(("a=candidate", "a=end-of-candidates"))
    )


# --------------------------------------------------------------------------- a browser on the local page
def browser_skip_reason() -> str | None:
    """Why a browser viewer cannot run here (None when it can): a private namespace and Chromium."""
    reason = unavailable_reason()
    if reason:
        return reason
    if find_chromium() is None:
        return "Debian chromium is not installed (test.sh installs it: apt-get install -y chromium)"
    return None


def insecure_origin_flags(port: int) -> list[str]:
    # A page on http://10.200.0.1 is not a "secure context", where browsers refuse the
    # microphone; a person uses http://127.0.0.1 (secure) and this flag stands in for that.
    return [f"--unsafely-treat-insecure-origin-as-secure=http://{SERVER_ADDRESS}:{port}"]


def wait_for_page(page: Page, expression: str, timeout: float) -> object:
    """Evaluate `expression` until it is truthy or `timeout` s pass; returns its last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = page.evaluate(expression)
        if value:
            return value
        time.sleep(0.2)
    return value


def open_viewer(browser: Chromium, url: str, log_path) -> tuple[Page, tuple[int, int]]:
    """Open the page, click Start and wait for the avatar's video; returns the page and the video size."""
    page = browser.new_page(url)
    assert wait_for_page(page, "document.readyState === 'complete' && !!window.musetalk", 30)
    assert "How to use" in page.evaluate("document.body.innerText")
    page.evaluate("document.getElementById('start').click()", user_gesture=True)
    connected = wait_for_page(
        page, "window.musetalk.pc && window.musetalk.pc.connectionState === 'connected' "
        "&& window.musetalk.video.videoWidth > 0 && window.musetalk.video.currentTime > 0", 45,
    )  # fmt: skip
    state = page.evaluate("document.getElementById('state').textContent")
    assert connected, (
        f"no video on {url}: page state {state!r}; console {browser.console}\n{log_path.read_text()[-3000:]}"
    )
    assert "connected" in state
    video_w, video_h = page.evaluate("[window.musetalk.video.videoWidth, window.musetalk.video.videoHeight]")
    return page, (video_w, video_h)


def bot_status_of(page: Page) -> dict:
    """The bot's /api/status, fetched by the page (with the page's `?key=`, as its own client sends it)."""
    return page.evaluate(
        "fetch('/api/status', {cache: 'no-store', headers: {Authorization: "
        "`Bearer ${new URLSearchParams(location.search).get('key') || ''}`}}).then((r) => r.json())"
    )


# --------------------------------------------------------------------------- the face the browser shows
def face_box(avatar) -> tuple[int, int, int, int]:
    """One box (avatar pixels) holding the face in every frame of the idle loop."""
    boxes = np.asarray(avatar.boxes)
    return int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()), int(boxes[:, 3].max())


def reference_crops(avatar, box, video_size) -> np.ndarray:
    """The avatar's own frames as the browser would sample them: (N, CROP, CROP) float32 grey."""
    vw, vh = video_size
    aw, ah = avatar.size
    sx, sy = vw / aw, vh / ah
    x0, y0, x1, y1 = (int(round(v)) for v in (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
    out = []
    for frame in avatar.frames:
        scaled = frame if (aw, ah) == (vw, vh) else cv2.resize(frame, (vw, vh), interpolation=cv2.INTER_AREA)
        crop = cv2.resize(scaled[y0:y1, x0:x1], (CROP, CROP), interpolation=cv2.INTER_AREA)
        grey = (
            crop[..., 0].astype(np.int32) * 77
            + crop[..., 1].astype(np.int32) * 150
            + crop[..., 2].astype(np.int32) * 29
        ) >> 8
        out.append(grey.astype(np.float32))
    return np.stack(out)


# In-page (inside a MEASURE_JS with `cfg`, `mt` = window.musetalk and its recording `m`): for every video frame the
# browser presents, its timing and a CROP x CROP grey crop of the avatar's face box (base64) go into `m.frames`.
FACE_FRAMES_JS = r"""
  const canvas = document.createElement("canvas");
  canvas.width = cfg.crop; canvas.height = cfg.crop;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const toB64 = (bytes) => { let s = ""; for (let i = 0; i < bytes.length; i++) s += String.fromCharCode(bytes[i]); return btoa(s); };
  const onFrame = (now, meta) => {
    if (m.done) return;
    try {
      const sx = meta.width / cfg.videoW, sy = meta.height / cfg.videoH;
      const [x0, y0, x1, y1] = cfg.box;
      ctx.drawImage(mt.video, x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy, 0, 0, cfg.crop, cfg.crop);
      const px = ctx.getImageData(0, 0, cfg.crop, cfg.crop).data;
      const grey = new Uint8Array(cfg.crop * cfg.crop);
      for (let i = 0; i < grey.length; i++) grey[i] = (px[4 * i] * 77 + px[4 * i + 1] * 150 + px[4 * i + 2] * 29) >> 8;
      m.frames.push({ t: now, shown: meta.expectedDisplayTime, rx: meta.receiveTime ?? null, rtp: meta.rtpTimestamp ?? null,
                      n: meta.presentedFrames, w: meta.width, h: meta.height, g: toB64(grey) });
    } catch (e) { m.errors.push(String(e)); }
    mt.video.requestVideoFrameCallback(onFrame);
  };
  mt.video.requestVideoFrameCallback(onFrame);
"""
