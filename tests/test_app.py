"""The control panel (app.py), driven as an operator or a script would drive it.

A real `python app.py` server on a free loopback port, with the tiny models in the real
on-disk formats (MUSETALK_MODELS_DIR) and a temporary avatars folder; `gradio_client` calls
its API names; headless Debian Chromium opens every tab and saves screenshots to
test-artifacts/. A second server with an empty models folder checks the missing-weights path.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import httpx
import media
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from helpers import ARTIFACTS, SHIPPED_BOT_CONFIG, PanelServer, panel_env, poll
from viewers import candidate_free_offer

TOKEN = "sekrit-daily-token-42"


# --------------------------------------------------------------------------- helpers
def app_error(call) -> str:
    with pytest.raises(AppError) as info:
        call()
    return str(info.value)


def assert_operator_message(message: str, *expected: str) -> None:
    assert "Traceback" not in message and 'File "' not in message, message
    for text in expected:
        assert text in message, message


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("panel-media")
    return {
        "face": media.astronaut_video(root / "astronaut.mp4", seconds=2.0),
        "long_face": media.astronaut_video(root / "long-astronaut.mp4", seconds=8.0),
        "cat": media.still_video(root / "cat.mp4", "chelsea"),
        "speech": media.speech_wav(root / "hello.wav", "Hello there."),
    }


@pytest.fixture(scope="module")
def panel(tiny_models_dir, tmp_path_factory, finish_later):
    tmp = tmp_path_factory.mktemp("panel")
    avatars = tmp / "avatars"
    # No --bot-config: the default, configs/bot/conversation.yaml, is read relative to the working
    # directory (the panel runs in `tmp`), so the shipped file is copied there; this also keeps the
    # repository's own file out of reach of anything the panel saves.
    (tmp / "configs" / "bot").mkdir(parents=True)
    shutil.copyfile(SHIPPED_BOT_CONFIG, tmp / "configs" / "bot" / "conversation.yaml")
    server = PanelServer([], panel_env(tiny_models_dir, avatars, tmp), tmp / "app.log")
    try:
        server.wait_ready()
        server.client = Client(server.url, verbose=False)
        server.avatars = avatars
        yield server
    finally:  # Ctrl-C, exit code 0 and no Daily token in its log, checked while the next tests run
        finish_later("test_app.py's panel", lambda: server.stop_checked(TOKEN))


@pytest.fixture(scope="module")
def prepared(panel, videos) -> dict:
    """The astronaut clip prepared through the panel as `astro`."""
    return panel.client.predict(handle_file(str(videos["face"])), "astro", 0, 10, "jaw", 90, False, api_name="/prepare")


# --------------------------------------------------------------------------- API tests
def test_api_names_are_published(panel):
    endpoints = panel.client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in (
        "preview", "prepare", "cancel_prepare", "list_avatars", "rename_avatar", "delete_avatar",
        "reprepare_avatar", "start_bot", "stop_bot", "bot_status", "render", "system_info", "load_models",
    ):  # fmt: skip
        assert f"/{name}" in endpoints, sorted(endpoints)


def test_preview_shows_four_frames_and_the_shift_range(panel, videos):
    gallery, summary = panel.client.predict(
        handle_file(str(videos["face"])), 0, 10, "jaw", 90, api_name="/preview"
    )  # fmt: skip
    assert len(gallery) == 4
    from PIL import Image

    for item in gallery:
        with Image.open(item["image"]) as img:
            width, height = img.size
        assert width == 2 * height, "each preview image is the annotated frame beside a generated one"
        assert item["caption"].startswith("frame ") and "mask line" in item["caption"]
    assert "Adjustable bbox_shift range for this clip" in summary
    assert "Mask: **jaw**" in summary


def test_prepare_lists_the_avatar_with_its_manifest(panel, prepared):
    assert prepared["name"] == "astro" and prepared["frame_count"] == 50 and prepared["fps"] == 25
    assert prepared["source_exists"], "the uploaded video is kept for re-preparing"
    listed = panel.client.predict(api_name="/list_avatars")
    assert [m["name"] for m in listed] == ["astro"]
    entry = listed[0]
    assert entry["frame_size"] == [512, 512] and entry["disk_bytes"] > 0 and entry["created"]
    assert entry["preparation"]["bbox_shift"] == 0 and entry["preparation"]["extra_margin"] == 10
    # Preparing again under the same name needs `replace`.
    message = app_error(
        lambda: panel.client.predict(handle_file(prepared["source_video"]), "astro", 0, 10, "jaw", 90, False, api_name="/prepare")
    )  # fmt: skip
    assert_operator_message(message, "already exists", "Replace")


def test_video_without_a_face_is_a_clear_error(panel, videos):
    message = app_error(
        lambda: panel.client.predict(handle_file(str(videos["cat"])), 0, 10, "jaw", 90, api_name="/preview")
    )  # fmt: skip
    assert_operator_message(message, "No face found")
    message = app_error(
        lambda: panel.client.predict(handle_file(str(videos["cat"])), "cat", 0, 10, "jaw", 90, False, api_name="/prepare")
    )  # fmt: skip
    assert_operator_message(message, "No face found")
    assert "cat" not in [m["name"] for m in panel.client.predict(api_name="/list_avatars")]


def test_bot_start_status_stop_and_start_again(panel, prepared):
    client = panel.client
    assert client.predict(api_name="/bot_status")["state"] in ("stopped", "error")
    for cycle in range(2):
        status = client.predict("astro", "local", "", "", "mirror", 0, "127.0.0.1", api_name="/start_bot")
        assert status["state"] == "running", status
        assert status["transport"] == "local" and status["url"].startswith("http://127.0.0.1:")
        # Another bot next to it (the panel runs up to --max-bots), stopped by its id; the first goes on.
        other = client.predict("astro", "local", "", "", "mirror", 0, "127.0.0.1", 1.0, api_name="/start_bot")
        assert other["state"] == "running" and other["bot_id"] != status["bot_id"] and other["url"] != status["url"]
        running = [b["bot_id"] for b in client.predict(api_name="/list_bots") if b["state"] == "running"]
        assert sorted(running) == sorted([status["bot_id"], other["bot_id"]])
        assert client.predict(other["bot_id"], api_name="/stop_bot_id")["state"] == "stopped"
        bots = {b["bot_id"]: b["state"] for b in client.predict(api_name="/list_bots")}
        assert bots[status["bot_id"]] == "running" and bots[other["bot_id"]] == "stopped"
        assert "No bot 'bot-999'" in app_error(lambda: client.predict("bot-999", api_name="/stop_bot_id"))

        # A viewer connects to the local page: its pipeline sends video (idle frames here).
        answer = httpx.post(
            status["url"] + "api/offer", json={"sdp": candidate_free_offer(), "type": "offer"}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        live = poll(lambda: client.predict(api_name="/bot_status"), lambda s: (s["fps"] or 0) > 0)
        assert live["state"] == "running" and (live["fps"] or 0) > 0 and live["frames"] > 0, live
        assert live["last_error"] is None and live["viewers"] == 1
        service = client.predict(api_name="/service_status")
        assert service["sessions"] == 1 and service["device"].startswith("cpu"), service  # silence: idle, no model work

        stopped = client.predict(api_name="/stop_bot")
        assert stopped["state"] == "stopped", f"cycle {cycle}: {stopped}"
        assert client.predict(api_name="/bot_status")["state"] == "stopped"


def test_bot_errors_are_readable_and_never_show_the_token(panel, prepared):
    client = panel.client
    message = app_error(
        lambda: client.predict("astro", "daily", f"https://acme.daily.co/room?t={TOKEN}", TOKEN, "mirror", 0, "127.0.0.1", api_name="/start_bot")
    )  # fmt: skip
    assert_operator_message(message, "query")
    assert TOKEN not in message
    # Only Daily hosts: refused before anything starts.
    message = app_error(
        lambda: client.predict("astro", "daily", "https://example.com/room", "", "mirror", 0, "127.0.0.1", api_name="/start_bot")
    )  # fmt: skip
    assert_operator_message(message, "example.com is not a Daily host", "daily.co")
    assert client.predict(api_name="/bot_status")["state"] == "stopped"
    # Conversation with the shipped config: its keys' variables are not set in the panel's environment.
    message = app_error(
        lambda: client.predict("astro", "local", "", "", "conversation", 0, "127.0.0.1", api_name="/start_bot")
    )  # fmt: skip
    assert_operator_message(message, "stt.api_key_env names STT_API_KEY, which is not set", "export STT_API_KEY=")
    message = app_error(
        lambda: client.predict("astro", "local", "", "", "shout", 0, "127.0.0.1", api_name="/start_bot")
    )  # fmt: skip
    # The Mode radio refuses it (Gradio's check of its choices), naming the modes there are.
    assert_operator_message(message, "'shout'", "not in the list of choices", "['mirror', 'say', 'conversation']")
    assert client.predict(api_name="/bot_status")["state"] != "running"
    message = app_error(
        lambda: client.predict("nobody", "local", "", "", "mirror", 0, "127.0.0.1", api_name="/start_bot")
    )
    assert_operator_message(message, "No avatar named 'nobody'", "astro")
    # A port in use: the start fails with a message, the status shows it, and Start works again.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        taken = blocker.getsockname()[1]
        message = app_error(
            lambda: client.predict("astro", "local", "", "", "mirror", taken, "127.0.0.1", api_name="/start_bot")
        )  # fmt: skip
        assert_operator_message(message, f"Port {taken}", "already in use")
    status = client.predict(api_name="/bot_status")
    assert status["state"] == "error" and "already in use" in status["last_error"]
    assert TOKEN not in json.dumps(status)
    # Stop after a failed start: "stopped", and the error stays readable.
    stopped = client.predict(api_name="/stop_bot")
    assert stopped["state"] == "stopped" and "already in use" in stopped["last_error"], stopped
    from musetalk.panel.text import status_view

    view = status_view(stopped)
    assert "Bot: **stopped**" in view and "already in use" in view and "did not stop" not in view
    again = client.predict("astro", "local", "", "", "mirror", 0, "127.0.0.1", api_name="/start_bot")
    assert again["state"] == "running" and again["last_error"] is None
    assert client.predict(api_name="/stop_bot")["state"] == "stopped"


LONG_TEXT = " ".join(
    [
        "This is a long announcement from the avatar, read out through the panel's API.",
        "It goes on for a while, sentence after sentence, so that there is plenty of time to interrupt it.",
        "The operator listens for a moment, decides that it has heard enough, and presses Stop speaking.",
        "Everything after that point is dropped, and nobody should ever hear the end of it.",
    ]
    * 2
)


def open_viewer(client: Client, status: dict) -> dict:
    """A viewer on the bot's local page (a candidate-free offer: its pipeline runs, no media flows)."""
    answer = httpx.post(status["url"] + "api/offer", json={"sdp": candidate_free_offer(), "type": "offer"}, timeout=30)
    assert answer.status_code == 200, answer.text
    live = poll(
        lambda: bot_by_id(client, status["bot_id"]), lambda s: s["viewers"] == 1 and s["frames"] > 0, timeout=60
    )  # fmt: skip
    assert live["viewers"] == 1 and live["frames"] > 0 and live["state"] == "running", live
    return live


def bot_by_id(client: Client, bot_id: str) -> dict:
    return next(b for b in client.predict(api_name="/list_bots") if b["bot_id"] == bot_id)


def test_a_say_bot_speaks_and_stops_through_the_api(panel, prepared):
    client = panel.client
    config = client.predict(api_name="/bot_config")
    assert config["config"] == "configs/bot/conversation.yaml", config
    assert config["tts"] == {"service": "espeak", "voice": "en-us"}, config
    assert config["stt"]["api_key_env"] == "STT_API_KEY" and config["llm"]["api_key_env"] == "LLM_API_KEY"
    assert config["llm"]["base_url"] == "http://127.0.0.1:11434/v1" and config["llm"]["model"] == "llama3.2"
    for role in ("stt", "llm", "tts"):  # variable names only: no field holds a key
        assert set(config[role]) <= {"service", "base_url", "model", "api_key_env", "voice", "language"}, config

    status = client.predict("astro", "local", "", "", "say", 0, "127.0.0.1", api_name="/start_bot")
    assert status["state"] == "running" and status["mode"] == "say", status
    bot = status["bot_id"]
    message = app_error(lambda: client.predict(bot, "Hello.", api_name="/say"))
    assert_operator_message(message, "Nobody is watching", status["url"])
    open_viewer(client, status)

    t0 = time.monotonic()
    said = client.predict(bot, LONG_TEXT, api_name="/say")
    returned_s = time.monotonic() - t0
    assert said["bot_id"] == bot and said["mode"] == "say", said
    assert returned_s < 2.0, f"say returns at once, not after the speech ({returned_s:.1f} s)"
    speaking = poll(lambda: client.predict(api_name="/bot_status"), lambda s: s["speaking"], timeout=20, every=0.2)
    assert speaking["bot_id"] == bot and speaking["speaking"], speaking
    mouth = poll(
        lambda: client.predict(api_name="/bot_status"), lambda s: s["first_mouth_ms"] is not None, timeout=20, every=0.2
    )  # fmt: skip
    assert mouth["first_mouth_ms"] is not None and mouth["first_mouth_ms"] > 0, mouth
    assert mouth["speaking"], f"the long text was over before it could be interrupted: {mouth}"

    t_stop = time.monotonic()
    assert client.predict(bot, api_name="/interrupt_bot")["state"] == "running"
    quiet = poll(lambda: client.predict(api_name="/bot_status"), lambda s: not s["speaking"], timeout=1.5, every=0.1)
    stopped_s = time.monotonic() - t_stop
    assert not quiet["speaking"], f"still speaking {stopped_s:.1f} s after interrupt_bot: {quiet}"
    assert quiet["state"] == "running", quiet
    turns = poll(
        lambda: client.predict(api_name="/bot_status")["transcript"],
        lambda ts: any(t["role"] == "avatar" and t["interrupted"] for t in ts),
        timeout=10,
    )  # fmt: skip
    assert any(t["role"] == "avatar" and t["interrupted"] for t in turns), turns
    assert "end of it" not in " ".join(t["text"] for t in turns), "what was queued after the interruption was dropped"

    client.predict(bot, "Hello again.", api_name="/say")
    again = poll(
        lambda: client.predict(api_name="/bot_status"),
        lambda s: any(t["role"] == "avatar" and "Hello again" in t["text"] for t in s["transcript"]),
        timeout=60,
    )  # fmt: skip
    assert any(t["role"] == "avatar" and "Hello again" in t["text"] for t in again["transcript"]), again
    done = poll(lambda: client.predict(api_name="/bot_status"), lambda s: not s["speaking"], timeout=60)
    assert not done["speaking"] and done["state"] == "running", done

    assert_operator_message(app_error(lambda: client.predict(bot, "   ", api_name="/say")), "empty")
    message = app_error(lambda: client.predict(bot, "a" * 10_000, api_name="/say"))
    assert_operator_message(message, "10000 characters", "Split it")
    mirror = client.predict("astro", "local", "", "", "mirror", 0, "127.0.0.1", api_name="/start_bot")
    assert mirror["state"] == "running" and mirror["mode"] == "mirror", mirror
    message = app_error(lambda: client.predict(mirror["bot_id"], "Hello.", api_name="/say"))
    assert_operator_message(message, "mirror mode", "say or conversation")
    assert bot_by_id(client, bot)["state"] == "running", "the say bot is not affected"
    for bot_id in (mirror["bot_id"], bot):
        assert client.predict(bot_id, api_name="/stop_bot_id")["state"] == "stopped"
    print(
        f"\npanel say: /say answered in {returned_s * 1000:.0f} ms, first mouth {mouth['first_mouth_ms']:.0f} ms, "
        f"silent {stopped_s * 1000:.0f} ms after /interrupt_bot was called"
    )


@pytest.mark.slow  # a second panel of its own
def test_the_bot_config_can_be_edited_checked_and_saved(panel, prepared, tiny_models_dir, tmp_path, finish_later):
    import yaml
    from openai_standin import OpenAIStandIn, unreachable_url

    secret = "sk-panel-secret-123"
    avatars = tmp_path / "avatars"
    shutil.copytree(panel.avatars / "astro", avatars / "astro")
    answers: list = []  # every API answer, checked for the key at the end

    with OpenAIStandIn(require_key=secret) as api:
        data = yaml.safe_load(SHIPPED_BOT_CONFIG.read_text())
        for role in ("stt", "llm"):
            data[role].update(base_url=api.base_url, api_key_env="TEST_LLM_KEY")
        config_file = tmp_path / "bot.yaml"
        config_file.write_text(yaml.safe_dump(data, sort_keys=False))
        on_disk = config_file.read_bytes()
        server = PanelServer(
            ["--bot-config", str(config_file)],
            panel_env(tiny_models_dir, avatars, tmp_path, TEST_LLM_KEY=secret),
            tmp_path / "app.log",
        )
        try:
            server.wait_ready()
            client = Client(server.url, verbose=False)

            def call(*args, api_name: str):
                result = client.predict(*args, api_name=api_name)
                answers.append(result)
                return result

            def failure(*args, api_name: str) -> str:
                message = app_error(lambda: client.predict(*args, api_name=api_name))
                answers.append(message)
                return message

            shown = call(api_name="/bot_config")
            assert shown["config"] == str(config_file), shown
            assert shown["llm"] == {"service": "openai", "base_url": api.base_url, "model": "llama3.2", "api_key_env": "TEST_LLM_KEY"}  # fmt: skip
            ready = call("conversation", api_name="/check_bot_config")
            assert ready == "Ready for conversation: every service answers.", ready
            ready = call("say", api_name="/check_bot_config")
            assert ready == "Ready for say: every service answers.", ready
            assert api.requests and all(r.api_key == secret for r in api.requests), "the key from $TEST_LLM_KEY is sent"

            # Another LLM address for the next start, not saved: the check and the start both say where nothing answers.
            dead = unreachable_url()
            edits = [shown["system_prompt"], "openai", api.base_url, "whisper-1", dead, "llama3.2", "espeak", "en-us", ""]  # fmt: skip
            answer = call(*edits, api_name="/set_bot_config")
            edited = call(api_name="/bot_config")
            assert answer == edited
            assert edited["llm"]["base_url"] == dead and edited["llm"]["api_key_env"] == "TEST_LLM_KEY", edited
            assert (
                edited["config"] == f"{config_file} (as edited in the panel, not saved)"
                and edited["stt"] == shown["stt"]
            )
            assert config_file.read_bytes() == on_disk, "set_bot_config without saving leaves the file alone"
            check = call("conversation", api_name="/check_bot_config")
            assert check.startswith("Not ready for conversation") and f"No LLM answers at {dead}" in check, check
            message = failure("astro", "local", "", "", "conversation", 0, "127.0.0.1", api_name="/start_bot")
            assert_operator_message(message, f"No LLM answers at {dead}", "llm.base_url")
            assert call(api_name="/bot_status")["state"] != "running"

            edits[4] = api.base_url
            call(*edits, api_name="/set_bot_config")
            restored = call(api_name="/bot_config")
            assert restored["llm"] == shown["llm"] and config_file.read_bytes() == on_disk
            assert call("conversation", api_name="/check_bot_config").startswith("Ready for conversation")

            status = call("astro", "local", "", "", "conversation", 0, "127.0.0.1", api_name="/start_bot")
            assert status["state"] == "running" and status["mode"] == "conversation", status
            answers.append(open_viewer(client, status))
            answers.append(call(api_name="/list_bots"))
            stopped = call(api_name="/stop_bot")
            assert stopped["state"] == "stopped" and stopped["last_error"] is None, stopped
        finally:  # Ctrl-C, exit code 0 and the key not in its log, checked while the next tests run
            finish_later("the bot-config panel", lambda: server.stop_checked(secret))
    assert all(r.api_key == secret for r in api.requests), "every request to the services carried the key"
    for answer in answers:
        assert secret not in json.dumps(answer), answer
    assert config_file.read_bytes() == on_disk


def test_render_returns_an_mp4(panel, prepared, videos):
    result = panel.client.predict("astro", handle_file(str(videos["speech"])), api_name="/render")
    path = Path(result["video"] if isinstance(result, dict) else result)
    assert path.suffix == ".mp4" and path.stat().st_size > 1000
    assert path.read_bytes()[4:8] == b"ftyp"


def test_prepare_can_be_cancelled_while_status_keeps_answering(panel, videos):
    client = panel.client
    job = client.submit(handle_file(str(videos["long_face"])), "long", 0, 10, "jaw", 90, False, api_name="/prepare")
    # Wait until the preparation reports progress, then ask for the status and cancel.
    poll(job.status, lambda s: bool(s.progress_data) or job.done(), timeout=60, every=0.1)
    assert not job.done(), "the preparation finished before it could be cancelled"
    assert client.predict(api_name="/bot_status")["state"] in ("stopped", "error")
    message = app_error(
        lambda: client.predict("long", "local", "", "", "mirror", 0, "127.0.0.1", api_name="/start_bot")
    )  # fmt: skip
    assert_operator_message(message, "'long' is being prepared")
    assert "Cancelling" in client.predict(api_name="/cancel_prepare")
    with pytest.raises(AppError, match="cancelled"):
        job.result(timeout=120)
    assert "long" not in [m["name"] for m in client.predict(api_name="/list_avatars")]


def test_reprepare_rename_and_delete(panel, videos):
    client = panel.client
    client.predict(handle_file(str(videos["face"])), "spare", 0, 10, "polygon", 90, False, api_name="/prepare")
    again = client.predict("spare", 3, 12, "polygon", 90, None, api_name="/reprepare_avatar")
    assert again["preparation"]["bbox_shift"] == 3 and again["preparation"]["extra_margin"] == 12
    assert client.predict("spare", "spare-2", api_name="/rename_avatar") == "spare-2"
    message = app_error(lambda: client.predict("spare-2", "bad name!", api_name="/rename_avatar"))
    assert_operator_message(message, "Invalid avatar name")
    client.predict("spare-2", api_name="/delete_avatar")
    names = [m["name"] for m in client.predict(api_name="/list_avatars")]
    assert "spare-2" not in names and "spare" not in names
    message = app_error(lambda: client.predict("spare-2", api_name="/delete_avatar"))
    assert_operator_message(message, "No avatar named 'spare-2'")
    # The kept source videos of deleted avatars are removed; the remaining avatar's stays.
    kept = sorted(p.name for p in (panel.avatars / ".sources").iterdir())
    assert len(kept) == 1 and kept[0].startswith("astro-"), kept


def test_max_side_and_landmarks_reach_the_manifest_and_older_avatars_are_marked(panel, videos):
    from musetalk.panel.text import OLDER_RULES, manifest_markdown

    client = panel.client
    # The two new inputs come last, so the calls above (without them) still work.
    small = client.predict(
        handle_file(str(videos["face"])), "small", 0, 10, "polygon", 90, False, 256, "offline", api_name="/prepare"
    )  # fmt: skip
    assert max(small["frame_size"]) <= 256 and small["preparation"]["source"]["size"] == [512, 512], small
    on_disk = json.loads((panel.avatars / "small" / "manifest.json").read_text())
    assert on_disk["format_version"] == 2 and on_disk["preparation"]["landmark_source"] == "offline"
    assert on_disk["preparation"]["max_side"] == 256 and on_disk["preparation"]["landmarks"] == "offline"
    listed = {m["name"]: m for m in client.predict(api_name="/list_avatars")}
    entry = listed["small"]
    assert entry["landmark_source"] == "offline" and entry["format_version"] == 2 and entry["older_rules"] is None

    # An avatar written by the older rules (format 1, no landmark source) is marked, and re-prepares.
    shutil.copytree(panel.avatars / "small", panel.avatars / "old-small")  # shares small's kept source video
    old = json.loads((panel.avatars / "old-small" / "manifest.json").read_text())
    old["format_version"] = 1
    for key in ("landmark_source", "landmarks", "max_side"):
        del old["preparation"][key]
    (panel.avatars / "old-small" / "manifest.json").write_text(json.dumps(old))
    entry = {m["name"]: m for m in client.predict(api_name="/list_avatars")}["old-small"]
    assert entry["damaged"] is False and entry["format_version"] == 1 and entry["landmark_source"] is None
    assert entry["older_rules"] == OLDER_RULES and OLDER_RULES in manifest_markdown(entry)
    again = client.predict("old-small", 0, 10, "polygon", 90, None, api_name="/reprepare_avatar")
    assert again["format_version"] == 2 and again["older_rules"] is None
    assert again["landmark_source"] == "offline", "auto without a DWPose file: the offline face mesh"
    assert again["frame_size"] == [512, 512], "re-preparing uses today's max_side (1920) by default"
    entry = {m["name"]: m for m in client.predict(api_name="/list_avatars")}["old-small"]
    assert entry["format_version"] == 2 and entry["older_rules"] is None
    for name in ("old-small", "small"):
        client.predict(name, api_name="/delete_avatar")


def test_a_damaged_dwpose_file_is_one_clear_error_and_offline_landmarks_still_work(panel, videos, tiny_models_dir):
    client = panel.client
    video = handle_file(str(videos["face"]))
    target = tiny_models_dir / "dwpose" / "dw-ll_ucoco_384.onnx"
    assert not target.exists(), "the tiny model set has no DWPose file"
    created = not target.parent.exists()
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(b"not an onnx model\n" * 64)
    try:
        for call in (
            lambda: client.predict(video, 0, 10, "jaw", 90, api_name="/preview"),
            lambda: client.predict(video, "dw", 0, 10, "jaw", 90, False, api_name="/prepare"),
        ):
            message = app_error(call)
            assert_operator_message(
                message, str(target), "not a loadable ONNX model", "bash download_weights.sh", "Offline face mesh"
            )
            assert "--landmarks" not in message, "the panel names its own control, not the CLI flag"
        gallery, summary = client.predict(video, 0, 10, "jaw", 90, 1920, "offline", api_name="/preview")
        assert len(gallery) == 4 and "Landmarks: offline face mesh" in summary
    finally:
        target.unlink()
        if created:
            target.parent.rmdir()
    message = app_error(lambda: client.predict(video, 0, 10, "jaw", 90, 1920, "dwpose", api_name="/preview"))
    assert_operator_message(message, str(target), "is missing", "Offline face mesh")
    assert "dw" not in [m["name"] for m in client.predict(api_name="/list_avatars")]


def test_an_avatar_in_use_cannot_be_deleted_renamed_or_prepared_again(panel, prepared):
    client = panel.client
    shutil.copytree(panel.avatars / "astro", panel.avatars / "victim")  # shares astro's kept source video
    status = client.predict("victim", "local", "", "", "mirror", 0, "127.0.0.1", api_name="/start_bot")
    assert status["state"] == "running", status
    calls = {
        "delete": lambda: client.predict("victim", api_name="/delete_avatar"),
        "rename": lambda: client.predict("victim", "victim-2", api_name="/rename_avatar"),
        "re-prepare": lambda: client.predict("victim", 3, 10, "jaw", 90, None, api_name="/reprepare_avatar"),
    }
    for action, call in calls.items():
        message = app_error(call)
        assert_operator_message(
            message,
            f"Cannot {action} avatar 'victim'",
            f"the local bot {status['bot_id']} (running",
            status["url"],
            "Stop the bot",
        )
    assert client.predict(api_name="/bot_status")["state"] == "running"
    assert client.predict(api_name="/stop_bot")["state"] == "stopped"
    assert client.predict("victim", api_name="/delete_avatar") == "Deleted avatar 'victim'."
    assert "victim" not in [m["name"] for m in client.predict(api_name="/list_avatars")]
    assert Path(prepared["source_video"]).is_file(), "astro still uses the kept video"


def test_damaged_avatars_are_listed_with_why_and_can_be_deleted(panel, prepared):
    client = panel.client
    broken = panel.avatars / "broken"
    shutil.copytree(panel.avatars / "astro", broken)
    manifest = broken / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])  # truncated
    kept = panel.avatars / ".sources" / "broken-20260101-120000.mp4"  # named as the panel keeps sources
    shutil.copyfile(prepared["source_video"], kept)
    listed = {m["name"]: m for m in client.predict(api_name="/list_avatars")}
    assert listed["astro"]["damaged"] is False and listed["astro"]["frame_count"] == 50
    entry = listed["broken"]
    assert entry["damaged"] is True and "unreadable" in entry["reason"] and "manifest.json" in entry["reason"]
    assert entry["kept_source"] == str(kept)
    # Another deletion prunes unused kept videos: the damaged avatar's copy stays (preparing it again needs it).
    shutil.copytree(panel.avatars / "astro", panel.avatars / "other")
    client.predict("other", api_name="/delete_avatar")
    assert kept.is_file()
    message = app_error(lambda: client.predict("broken", "fixed", api_name="/rename_avatar"))
    assert_operator_message(message, "Cannot rename avatar 'broken', it is damaged", "unreadable")
    done = client.predict("broken", api_name="/delete_avatar")
    assert done == f"Deleted avatar 'broken' and its kept source video {kept.name}."
    assert not broken.exists() and not kept.exists()
    assert "broken" not in [m["name"] for m in client.predict(api_name="/list_avatars")]


def test_system_info_says_what_runs_where(panel):
    # run alone, the panel may still be loading its models
    info = poll(lambda: panel.client.predict(api_name="/system_info"), lambda i: i["models_state"] != "loading", 120)
    assert info["device"].startswith("cpu") and info["missing"] == []
    assert info["models_state"].startswith("ready")
    assert {"torch", "pipecat-ai", "gradio"} <= set(info["versions"])
    # every required part is there; the tiny model set has none of the optional ones (DWPose, the Piper voice)
    assert all(part["present"] for part in info["weights"] if part["required"]), info["weights"]
    absent = [part["part"] for part in info["weights"] if not part["present"]]
    assert absent and all("(optional" in name for name in absent), absent
    files = {f["file"]: f for f in info["weight_files"]}
    assert files["musetalkV15/unet.pth"]["state"] == "present" and files["musetalkV15/unet.pth"]["size"] > 0
    assert (
        files["dwpose/dw-ll_ucoco_384.onnx"]["state"] == "missing"
        and not files["dwpose/dw-ll_ucoco_384.onnx"]["required"]
    )
    assert info["fetch_command"] == "bash download_weights.sh"


# --------------------------------------------------------------------------- missing weights
@pytest.mark.slow  # a second panel of its own
def test_missing_weights_the_panel_starts_and_says_what_to_fetch(tmp_path, videos, finish_later):
    empty = tmp_path / "no-models"
    empty.mkdir()
    server = PanelServer(
        ["--models-dir", str(empty), "--avatars-dir", str(tmp_path / "avatars"), "--auth", "operator:s3cret"],
        panel_env(tmp_path / "unused", tmp_path / "unused-avatars", tmp_path),
        tmp_path / "app.log",
    )
    try:
        server.wait_ready()
        with pytest.raises(ValueError):  # --auth: no API without the password
            Client(server.url, verbose=False)
        client = Client(server.url, auth=("operator", "s3cret"), verbose=False)
        message = app_error(
            lambda: client.predict(handle_file(str(videos["face"])), 0, 10, "jaw", 90, api_name="/preview")
        )
        assert_operator_message(message, "bash download_weights.sh", "missing", str(empty / "musetalkV15" / "unet.pth"))
        message = app_error(
            lambda: client.predict("astro", "local", "", "", "mirror", 0, "127.0.0.1", api_name="/start_bot")
        )
        assert_operator_message(message, "bash download_weights.sh")
        assert client.predict(api_name="/bot_status")["state"] == "stopped"
        info = client.predict(api_name="/system_info")
        assert info["models_state"].startswith("not loaded") and str(empty) in info["models_dir"]
        assert not any(part["present"] for part in info["weights"])
    finally:
        finish_later("the missing-weights panel", server.stop_checked)


# --------------------------------------------------------------------------- browser
TABS = {
    # tab: labels that must be on screen once it is open
    "Avatars": ["Video", "bbox_shift (px)", "extra_margin (px)", "Blend mask", "Cheek width", "Max side (px)", "Landmarks", "Preview", "Avatar name", "Prepare", "Cancel preparation", "Library"],
    "Live": ["Avatar", "Transport", "Local page on this machine", "Daily room", "Mode", "Say: speak the text you type",
             "Conversation: answer with an LLM", "Start", "Stop", "Frames per second", "Mouth latency", "Speak",
             "Stop speaking", "Transcript", "Speech services (say / conversation)"],
    "Render": ["Avatar", "Speech", "Render", "Lip-synced video"],
    "System": ["Device", "Weights", "MuseTalk v1.5 UNet", "bash download_weights.sh", "Load models", "Fetch weights", "Weight files"],
}  # fmt: skip


@pytest.mark.slow
def test_every_tab_renders_its_controls_in_a_browser(panel, prepared, videos):
    from browser import Chromium, find_chromium, screenshot, wait_js

    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    (panel.avatars / "wreck" / "frames").mkdir(parents=True)  # no manifest: listed as damaged
    shutil.copytree(panel.avatars / "astro", panel.avatars / "vintage")  # made by the older rules (format 1)
    vintage = json.loads((panel.avatars / "vintage" / "manifest.json").read_text())
    vintage["format_version"] = 1
    (panel.avatars / "vintage" / "manifest.json").write_text(json.dumps(vintage))
    with Chromium() as browser:
        page = browser.new_page(panel.url)
        page.call("Emulation.setDeviceMetricsOverride", {"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": False})  # fmt: skip
        assert wait_js(page, "document.querySelectorAll('button[role=tab]').length >= 4"), browser.console
        assert wait_js(page, "document.body.innerText.includes('Models ready')"), page.evaluate(
            "document.body.innerText"
        )
        for tab, labels in TABS.items():
            page.evaluate(
                f"[...document.querySelectorAll('button[role=tab]')].find(b => b.textContent.trim() === {json.dumps(tab)}).click()"
            )
            expected = json.dumps(labels)
            missing = wait_js(
                page, f"(() => {{ const t = document.body.innerText; return {expected}.every(l => t.includes(l)); }})()"
            )
            text = page.evaluate("document.body.innerText")
            assert missing, f"{tab}: missing {[label for label in labels if label not in text]}"
            if tab == "Avatars":  # the prepared avatar is in the library, with its manifest; the damaged one with why
                assert wait_js(page, "document.body.innerText.includes('astro · 50 frames')")
                assert wait_js(page, "document.body.innerText.includes('1 damaged avatar')")
                assert "manifest.json is missing" in page.evaluate("document.body.innerText")
                assert wait_js(page, "document.body.innerText.includes('1 avatar made with older preprocessing rules')")
            screenshot(page, ARTIFACTS / f"panel-{tab.lower()}.png")

        # Live: Daily shows its fields, the token field hides what is typed.
        page.evaluate(
            "[...document.querySelectorAll('button[role=tab]')].find(b => b.textContent.trim() === 'Live').click()"
        )
        page.evaluate(
            "[...document.querySelectorAll('label')].find(l => l.textContent.trim() === 'Daily room').querySelector('input').click()"
        )
        assert wait_js(
            page,
            "!!document.querySelector('input[type=password]') && document.body.innerText.includes('Daily room URL')",
        )
        screenshot(page, ARTIFACTS / "panel-live-daily.png")

        # Avatars: upload a video in the page; the preview gallery fills with 4 frames.
        page.evaluate(
            "[...document.querySelectorAll('button[role=tab]')].find(b => b.textContent.trim() === 'Avatars').click()"
        )
        root = page.call("DOM.getDocument", {"depth": -1, "pierce": True})["root"]["nodeId"]
        node = page.call("DOM.querySelector", {"nodeId": root, "selector": "input[type=file][accept*=video]"})["nodeId"]
        page.call("DOM.setFileInputFiles", {"nodeId": node, "files": [str(videos["face"])]})
        assert wait_js(page, "document.body.innerText.includes('Adjustable bbox_shift range')", timeout=90), (
            browser.console
        )
        assert wait_js(page, "document.body.innerText.includes('frame 49: mask line')")
        name_field = "document.querySelector('textarea[placeholder^=\"e.g.\"]').value"
        assert wait_js(page, f"{name_field} === 'astronaut'", timeout=10), page.evaluate(name_field)
        screenshot(page, ARTIFACTS / "panel-avatars-preview.png")
    assert panel.client.predict("wreck", api_name="/delete_avatar") == "Deleted avatar 'wreck'."
    assert panel.client.predict("vintage", api_name="/delete_avatar") == "Deleted avatar 'vintage'."


# --------------------------------------------------------------------------- command line
def test_address_flags_spaces_and_auth():
    import app

    assert app.resolve_address(None, None, {}) == ("127.0.0.1", 7860)
    assert app.resolve_address(None, None, {"SPACE_ID": "me/musetalk"}) == ("0.0.0.0", 7860)
    assert app.resolve_address(None, None, {"SPACE_ID": "me/musetalk", "GRADIO_SERVER_PORT": "7000"}) == (
        "0.0.0.0",
        7000,
    )
    assert app.resolve_address("127.0.0.1", 8000, {"SPACE_ID": "me/musetalk"}) == ("127.0.0.1", 8000)
    assert app.parse_auth("admin:pa:ss") == ("admin", "pa:ss")
    assert app.parse_auth(None) is None
    assert app.main(["--auth", "no-password"]) == 2


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow  # 105 starts and stops through the panel's API
def test_a_hundred_starts_and_stops_through_the_api_keep_the_panel_flat(panel, prepared):
    """As an operator's script would: start_bot (local page) / stop_bot through gradio_client. After 5 warm-ups,
    100 cycles grow the panel's RSS by less than 50 MB (ended bots keep their status, not their avatar)."""
    client, pid = panel.client, panel.proc.pid
    curve = []
    for cycle in range(105):
        status = client.predict("astro", "local", "", "", "mirror", 0, "127.0.0.1", api_name="/start_bot")
        assert status["state"] == "running", status
        assert client.predict(api_name="/stop_bot")["state"] == "stopped"
        if cycle == 4 or cycle % 20 == 4:
            curve.append((cycle + 1, round(_rss_mb(pid))))
    grown = curve[-1][1] - curve[0][1]
    print(f"\npanel RSS (cycle, MB): {curve}; {grown:+d} MB over 100 cycles after 5 warm-ups")
    assert grown < 50, curve
