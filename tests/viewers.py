"""A WebRTC viewer for tests that need the bot's pipeline running but no media (shared by several test files)."""

from __future__ import annotations

import asyncio


def candidate_free_offer() -> str:
    """A real WebRTC offer (aiortc; audio sendrecv, then video recvonly) with its ICE candidates
    removed: the bot answers and starts a viewer pipeline, but no packet ever leaves this
    process (no remote candidates, no STUN servers). Media flow is test_bot_browser.py's job."""
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
