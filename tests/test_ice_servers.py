"""ICE servers for the local page behind NAT: `--ice-servers` / `MUSETALK_ICE_SERVERS`.

Parsed and checked before anything starts, handed to Pipecat's SmallWebRTC handler (the bot's
side) and served to the page at `/api/ice-servers` (the browser's side).
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from musetalk.bot.page import LocalWebRTCServer
from musetalk.bot.transports import IceServerSpec, TransportSettings, parse_ice_servers
from musetalk.errors import ConfigError


def test_urls_with_credentials_and_json_lists_are_parsed():
    servers = parse_ice_servers("stun:stun.example.com:3478, alice:s3c@ret@turn:turn.example.com:3478?transport=udp")
    assert servers == (
        IceServerSpec(("stun:stun.example.com:3478",)),
        IceServerSpec(("turn:turn.example.com:3478?transport=udp",), "alice", "s3c@ret"),
    )
    assert "s3c@ret" not in repr(servers), "credentials stay out of logs"
    as_json = parse_ice_servers('[{"urls": ["turns:t.example.com:443"], "username": "u", "credential": "c"}]')
    assert as_json[0].to_browser() == {"urls": ["turns:t.example.com:443"], "username": "u", "credential": "c"}
    assert parse_ice_servers("") == () and parse_ice_servers(None) == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://turn.example.com", "is not a stun:, turn: or turns: URL"),
        ("turn:turn.example.com:3478", "needs a user name and credential"),
        ('[{"url": "stun:x"}]', "not a JSON list"),
    ],
)
def test_bad_ice_servers_are_refused_with_a_message(text, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_ice_servers(text)


def test_the_local_page_and_the_bot_use_the_same_servers():
    ice = parse_ice_servers("stun:stun.example.com:3478 bob:pw@turn:turn.example.com:3478")
    server = LocalWebRTCServer(TransportSettings(kind="local", port=0, ice_servers=ice), on_connection=None)
    answer = TestClient(server.app).get("/api/ice-servers").json()
    assert answer == {"iceServers": [
        {"urls": ["stun:stun.example.com:3478"]},
        {"urls": ["turn:turn.example.com:3478"], "username": "bob", "credential": "pw"},
    ]}  # fmt: skip
    handed = server._handler._ice_servers  # what Pipecat gives each peer connection
    assert [(s.urls, s.username, s.credential) for s in handed] == [
        (["stun:stun.example.com:3478"], None, None),
        (["turn:turn.example.com:3478"], "bob", "pw"),
    ]
    plain = LocalWebRTCServer(TransportSettings(kind="local", port=0), on_connection=None)
    assert TestClient(plain.app).get("/api/ice-servers").json() == {"iceServers": []}


def test_start_server_and_panel_read_the_flag_and_the_environment(monkeypatch):
    import app
    import start_pipecat_server

    assert start_pipecat_server.main(["--local", "--ice-servers", "turn:no-credentials.example.com"]) == 2
    args = app.build_parser().parse_args([])
    options = app.engine_options(args, {"MUSETALK_ICE_SERVERS": "stun:stun.example.com:3478", "SPACE_ID": "me/x"})
    assert options.ice_servers == (IceServerSpec(("stun:stun.example.com:3478",)),)
    assert options.fetch_at_start, "a Space fetches missing weights at start"
    args.ice_servers = "stun:flag.example.com:3478"
    options = app.engine_options(
        args, {"MUSETALK_ICE_SERVERS": "stun:env.example.com:1", "HF_ENDPOINT": "http://mirror"}
    )
    assert options.ice_servers[0].urls == ("stun:flag.example.com:3478",) and not options.fetch_at_start
    assert options.fetch.endpoint == "http://mirror" and options.fetch.offline is None
    assert app.engine_options(args, {"CI": "true"}).fetch.offline
