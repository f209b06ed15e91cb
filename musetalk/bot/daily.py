"""Daily errors as sentences an operator can act on."""

from __future__ import annotations

_DAILY_HINTS = (
    (
        ("lookup address", "name or service not known", "dns"),
        "its address does not resolve (no internet, or a wrong Daily subdomain?)",
    ),
    (
        ("unauthorized", "401", "403", "forbidden", "token", "not allowed", "ejected", "owner-only"),
        "access was refused (a private room needs a valid --token)",
    ),
    (
        ("not found", "404", "no such room", "does not exist", "not-found"),
        "this room does not exist (check the room name)",
    ),
    (("timed out", "timeout"), "Daily did not answer in time (network or firewall?)"),
    (("connect", "network", "unreachable"), "Daily cannot be reached from here (network or firewall?)"),
)


def daily_error_message(room_url: str, error: str) -> str:
    """A Daily error as one sentence an operator can act on, with Daily's own words after it."""
    lowered = error.lower()
    hint = next((text for keys, text in _DAILY_HINTS if any(k in lowered for k in keys)), "Daily reported an error")
    raw = " ".join(error.split())
    raw = raw if len(raw) <= 300 else raw[:297] + "..."
    return f"Daily: could not use the room {room_url}: {hint}. (Daily said: {raw})"
