"""A fresh panel on a (simulated) Hugging Face Space: weights come from the hub, no restart.

`python app.py` with SPACE_ID set, an empty models folder (only the face models, which come
from the package index, and the optional face parser) and HF_ENDPOINT pointing at a model hub
on 127.0.0.1 (tests/hub_standin.py) that serves the tiny models in the hub's URL layout. The
real `huggingface_hub` client fetches them at start-up, the models load and the banner turns
ready. Then a file is damaged and one deleted, and the System tab's "Fetch weights" button
fetches them again. Headless Chromium saves the System tab before, during and after a fetch
to test-artifacts/.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from browser import screenshot, wait_js
from gradio_client import Client
from helpers import ARTIFACTS, PanelServer, panel_env, poll
from hub_standin import HubStandIn

from musetalk import weights

pytestmark = pytest.mark.slow  # a panel fetching from a hub, watched in Chromium

UNET_KEY = "TMElyralab/MuseTalk/musetalkV15/unet.pth"
DWPOSE = "dwpose/dw-ll_ucoco_384.onnx"  # optional, and not on the hub stand-in


def serve_tiny_models(hub: HubStandIn, tiny: Path) -> None:
    """Every hub file of the registry but DWPose: the required ones from the tiny model set, the
    optional Piper voice as stand-in bytes (only checked against what the hub publishes, never
    loaded here). The optional DWPose file is not there (the hub answers 404): the panel gets
    ready without it and says so in one line."""
    for spec in weights.build_registry():
        if spec.source != "hub" or spec.target == DWPOSE:
            continue
        if spec.required:
            data = (tiny / spec.target).read_bytes()
        else:
            assert spec.target.startswith(f"{weights.PIPER_DIR}/"), f"no stand-in for the optional {spec.target}"
            data = piper_stand_in(spec.filename)
        hub.add(spec.repo, spec.filename, data)


def piper_stand_in(filename: str) -> bytes:
    """A small config for the voice's .onnx.json (a git file on the hub), 8 KB for its .onnx (an LFS file)."""
    if filename.endswith(".json"):
        return b'{"stand_in": "%s"}' % filename.encode()
    return bytes(range(256)) * 32


@pytest.fixture(scope="module")
def space(tiny_models_dir, tmp_path_factory, finish_later):
    tmp = tmp_path_factory.mktemp("space")
    models = tmp / "models"
    for folder in ("face-landmarks", "face-parse-bisent"):  # not from the model hub
        shutil.copytree(tiny_models_dir / folder, models / folder)
    with HubStandIn() as hub:
        serve_tiny_models(hub, tiny_models_dir)
        hub.hold[UNET_KEY] = threading.Event()  # the start-up fetch waits halfway through the UNet
        env = {
            **panel_env(models, tmp / "avatars", tmp),
            "SPACE_ID": "tester/musetalk-live",
            "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_DOWNLOAD_TIMEOUT": "120",
            "GRADIO_SERVER_NAME": "127.0.0.1",
        }
        env.pop("MUSETALK_OFFLINE", None)
        env.pop("CI", None)
        server = PanelServer([], env, tmp / "app.log")
        try:
            server.wait_ready()
            server.client = Client(server.url, verbose=False)
            server.hub, server.models = hub, models
            yield server
        finally:
            hub.hold[UNET_KEY].set()
            finish_later("the Space panel", server.stop_checked)  # Ctrl-C and exit code 0, while tests go on


def models_state(space) -> str:
    return space.client.predict(api_name="/system_info")["models_state"]


def open_system_tab(browser, url: str):
    page = browser.new_page(url)
    page.call("Emulation.setDeviceMetricsOverride", {"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": False})  # fmt: skip
    assert wait_js(page, "document.querySelectorAll('button[role=tab]').length >= 4"), browser.console
    page.evaluate(
        "[...document.querySelectorAll('button[role=tab]')].find(b => b.textContent.trim() === 'System').click()"
    )
    assert wait_js(page, "document.body.innerText.includes('Weight files')")
    return page


def test_a_fresh_space_fetches_the_weights_loads_and_turns_ready(space):
    from browser import Chromium, find_chromium

    state = poll(lambda: models_state(space), lambda s: s.startswith("fetching"), timeout=30)
    assert state.startswith("fetching weights: Fetching musetalkV15/unet.pth"), state
    if find_chromium() is not None:  # the banner shows the fetch while it runs
        ARTIFACTS.mkdir(exist_ok=True)
        with Chromium() as browser:
            page = open_system_tab(browser, space.url)
            banner = "document.getElementById('models-banner').innerText"
            assert wait_js(page, f"{banner}.includes('Fetching musetalkV15/unet.pth')"), page.evaluate(banner)
            screenshot(page, ARTIFACTS / "space-startup-fetching.png")
            space.hub.hold[UNET_KEY].set()
            assert wait_js(page, "document.body.innerText.includes('Models ready')", timeout=120)
            # On a Space the Live tab starts on a Daily room (a Space takes no WebRTC to a local page).
            page.evaluate(
                "[...document.querySelectorAll('button[role=tab]')].find(b => b.textContent.trim() === 'Live').click()"
            )
            assert wait_js(page, "document.body.innerText.includes('Daily room URL')")
    space.hub.hold[UNET_KEY].set()
    state = poll(lambda: models_state(space), lambda s: s.startswith("ready"), timeout=120)
    assert state.startswith("ready"), state
    info = space.client.predict(api_name="/system_info")
    states = {f["file"]: f["state"] for f in info["weight_files"]}
    assert states.pop(DWPOSE) == "missing"
    assert set(states.values()) == {"present"}, states  # the optional Piper voice was fetched too
    assert {
        f"{weights.PIPER_DIR}/{weights.PIPER_VOICE}.onnx",
        f"{weights.PIPER_DIR}/{weights.PIPER_VOICE}.onnx.json",
    } <= set(states)
    (line,) = info["fetch_errors"]  # the optional file the hub does not have: one line
    assert line.startswith("could not fetch dwpose/dw-ll_ucoco_384.onnx (yzd-v/DWPose/dw-ll_ucoco_384.onnx)")
    assert "\n" not in line and "unreachable" not in line
    fetched = weights.read_state(space.models)
    assert fetched["musetalkV15/unet.pth"]["commit"] and fetched["musetalkV15/unet.pth"]["sha256"]
    assert (space.models / "musetalkV15/unet.pth").read_bytes() == space.hub.files[UNET_KEY]


def test_fetch_weights_button_repairs_damaged_and_missing_files(space):
    from browser import Chromium, find_chromium

    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    poll(lambda: models_state(space), lambda s: s.startswith("ready"), timeout=120)
    unet = space.models / "musetalkV15/unet.pth"
    data = bytearray(unet.read_bytes())
    data[4096] ^= 0xFF
    unet.write_bytes(bytes(data))
    (space.models / "whisper/model.safetensors").unlink()
    space.hub.hold[UNET_KEY] = threading.Event()
    with Chromium() as browser:
        page = open_system_tab(browser, space.url)
        page.evaluate("document.getElementById('system-refresh-btn').click()")
        table = "document.getElementById('weights-table').innerText"
        assert wait_js(page, f"{table}.includes('damaged') && {table}.match(/missing/g).length === 2"), page.evaluate(
            table
        )
        screenshot(page, ARTIFACTS / "panel-system-weights-before.png")

        page.evaluate("document.getElementById('fetch-weights-btn').click()")
        assert wait_js(page, "document.body.innerText.includes('Fetching musetalkV15/unet.pth')"), page.evaluate(
            "document.body.innerText"
        )
        screenshot(page, ARTIFACTS / "panel-system-weights-during.png")
        space.hub.hold[UNET_KEY].set()

        assert wait_js(page, "document.getElementById('fetch-note').innerText.includes('Fetched 2 files')", timeout=120)
        assert wait_js(page, "document.body.innerText.includes('Models ready')", timeout=120)
        assert wait_js(page, f"!{table}.includes('damaged') && {table}.match(/missing/g).length === 1")
        assert wait_js(page, "document.body.innerText.includes('ready: cpu')", timeout=60)
        screenshot(page, ARTIFACTS / "panel-system-weights-after.png")
    info = space.client.predict(api_name="/system_info")
    states = {f["file"]: f["state"] for f in info["weight_files"]}
    assert states.pop(DWPOSE) == "missing"
    assert set(states.values()) == {"present"}, json.dumps(states)
    assert unet.read_bytes() == space.hub.files[UNET_KEY]
    assert models_state(space).startswith("ready")
