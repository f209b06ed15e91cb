"""musetalk.weights against a model hub on 127.0.0.1 (tests/hub_standin.py), with the real client.

The registry, fetching into an empty folder, a transfer broken mid-file (resumed in the same
call with a Range request), a transfer interrupted for good (resumed by the next run), damaged
files found and fetched again, and an unreachable hub (one line per file, also through
download_weights.sh).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hub_standin import HubStandIn

from musetalk import weights

REPO = Path(__file__).resolve().parent.parent
HUB_FILES = [f for f in weights.build_registry() if f.source == "hub"]


def content_for(spec: weights.WeightFile) -> bytes:
    """Small stand-ins: a JSON config for .json files, 48 KB of random bytes (an LFS file) otherwise."""
    if spec.filename.endswith(".json"):
        return b'{"stand_in": "%s"}' % spec.filename.encode()
    return os.urandom(48 * 1024)


@pytest.fixture()
def hub():
    with HubStandIn() as server:
        for spec in HUB_FILES:
            server.add(spec.repo, spec.filename, content_for(spec))
        yield server


def options(hub: HubStandIn) -> weights.FetchOptions:
    return weights.FetchOptions(endpoint=hub.endpoint, timeout=10)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_registry_names_every_file_once_with_what_is_lost_without_it():
    files = weights.build_registry()
    targets = [f.target for f in files]
    assert len(targets) == len(set(targets))
    required = {f.target for f in files if f.required}
    assert {"musetalkV15/unet.pth", "musetalkV15/musetalk.json", "sd-vae/config.json", "whisper/config.json",
            "face-landmarks/face_landmark.tflite"} <= required  # fmt: skip
    dwpose = next(f for f in files if f.target == "dwpose/dw-ll_ucoco_384.onnx")
    assert (dwpose.repo, dwpose.filename, dwpose.required) == ("yzd-v/DWPose", "dw-ll_ucoco_384.onnx", False)
    assert "face mesh" in dwpose.without
    for f in files:
        assert f.required or f.without, f"{f.target}: an optional file must say what is lost without it"
        if f.source == "wheel":
            assert f.size and f.sha256 and len(f.sha256) == 64


def test_fetch_into_an_empty_folder_uses_the_hub_layout_and_records_hashes(hub, tmp_path):
    seen = []
    report = weights.fetch(tmp_path, HUB_FILES, options=options(hub), progress=seen.append)
    assert report.errors == [] and sorted(report.fetched) == sorted(f.target for f in HUB_FILES)
    for spec in HUB_FILES:
        assert (tmp_path / spec.target).read_bytes() == hub.files[f"{spec.repo}/{spec.filename}"]
        assert ("HEAD", f"/{spec.repo}/resolve/main/{spec.filename}", None) in hub.requests
    state = weights.read_state(tmp_path)
    assert state["musetalkV15/unet.pth"]["sha256"] and state["musetalkV15/musetalk.json"]["git_sha1"]
    assert all(s.ok for s in report.statuses)
    # per-file progress: each file starts at 0 and ends at its size
    unet = [p for p in seen if p.file == "musetalkV15/unet.pth"]
    assert unet[0].done == 0 and unet[-1].done == unet[-1].total == 48 * 1024
    assert 0 < unet[-1].fraction <= 1
    # Nothing to do the second time: no request at all.
    before = len(hub.requests)
    again = weights.fetch(tmp_path, HUB_FILES, options=options(hub))
    assert again.fetched == [] and again.errors == [] and len(hub.requests) == before


def test_a_broken_transfer_resumes_with_a_range_request(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    key = "TMElyralab/MuseTalk/musetalkV15/unet.pth"
    hub.cut_once[key] = 20_000  # the connection drops after 20 000 of 49 152 bytes
    unet = [f for f in HUB_FILES if f.target == "musetalkV15/unet.pth"]
    report = weights.fetch(tmp_path, unet, options=options(hub))
    assert report.errors == [], report.errors
    assert (tmp_path / "musetalkV15/unet.pth").read_bytes() == hub.files[key]
    ranges = hub.gets(key)
    assert len(ranges) == 2 and ranges[0] is None, ranges
    start = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 20_000, ranges  # only what was not received is sent again


def test_an_interrupted_fetch_resumes_in_the_next_run(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    key = "TMElyralab/MuseTalk/musetalkV15/unet.pth"
    unet = [f for f in HUB_FILES if f.target == "musetalkV15/unet.pth"]

    class Closed(Exception):  # the panel closed mid-transfer
        pass

    def stop_midway(p: weights.Progress) -> None:
        if p.done >= 12_000:
            raise Closed("closed")

    first = weights.fetch(tmp_path, unet, options=options(hub), progress=stop_midway)
    assert len(first.errors) == 1 and "Closed" in first.errors[0]
    status = weights.check(tmp_path, unet)[0]
    assert status.state == "missing" and "partial download" in status.detail
    (partial,) = (tmp_path / "musetalkV15").glob(".unet.pth.*.part")
    kept = partial.stat().st_size
    assert 0 < kept < 48 * 1024
    second = weights.fetch(tmp_path, unet, options=options(hub))
    assert second.errors == [] and (tmp_path / "musetalkV15/unet.pth").read_bytes() == hub.files[key]
    resumed = hub.gets(key)[-1]
    assert resumed == f"bytes={kept}-", hub.gets(key)  # only the rest is sent
    assert not list((tmp_path / "musetalkV15").glob(".*.part")), "the partial file is renamed into place"


def test_damaged_files_are_found_and_fetched_again(hub, tmp_path):
    weights.fetch(tmp_path, HUB_FILES, options=options(hub))
    unet = tmp_path / "musetalkV15/unet.pth"
    data = bytearray(unet.read_bytes())
    data[1000] ^= 0xFF  # same size, different content
    unet.write_bytes(bytes(data))
    whisper = tmp_path / "whisper/model.safetensors"
    whisper.write_bytes(whisper.read_bytes()[:5000])  # truncated
    config = tmp_path / "sd-vae/config.json"
    config.write_bytes(b"")
    states = {s.spec.target: s for s in weights.check(tmp_path, HUB_FILES)}
    assert states["musetalkV15/unet.pth"].state == "damaged" and "sha256" in states["musetalkV15/unet.pth"].detail
    assert (
        states["whisper/model.safetensors"].state == "damaged"
        and "expected" in states["whisper/model.safetensors"].detail
    )
    assert states["sd-vae/config.json"].state == "damaged" and states["sd-vae/config.json"].detail == "empty file"
    report = weights.fetch(tmp_path, HUB_FILES, options=options(hub))
    assert sorted(report.fetched) == ["musetalkV15/unet.pth", "sd-vae/config.json", "whisper/model.safetensors"]
    assert all(s.ok for s in weights.check(tmp_path, HUB_FILES, verify=True))
    assert unet.read_bytes() == hub.files["TMElyralab/MuseTalk/musetalkV15/unet.pth"]


def test_a_download_that_arrives_damaged_is_refused(hub, tmp_path):
    spec = next(f for f in HUB_FILES if f.target == "whisper/model.safetensors")
    hub.corrupt.add(f"{spec.repo}/{spec.filename}")  # the HEAD publishes one sha256, the GET sends other bytes
    report = weights.fetch(tmp_path, [spec], options=options(hub))
    assert len(report.errors) == 1 and "arrived damaged" in report.errors[0]
    assert not (tmp_path / spec.target).exists() and not list((tmp_path / "whisper").glob(".*.part"))


def test_an_unreachable_hub_gives_one_line_per_file(tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    report = weights.fetch(tmp_path, HUB_FILES, options=weights.FetchOptions(endpoint=endpoint, timeout=5))
    assert len(report.errors) == len(HUB_FILES)
    for spec, line in zip(HUB_FILES, report.errors):
        assert "\n" not in line and line.startswith(f"could not fetch {spec.target} ({spec.repo}/{spec.filename})")
        assert f"the model hub at {endpoint} is unreachable" in line
    assert [s.state for s in report.statuses] == ["missing"] * len(HUB_FILES)


def test_download_weights_sh_reports_an_unreachable_hub_and_exits_0(tmp_path, landmarks_dir):
    models = tmp_path / "models"
    shutil.copytree(landmarks_dir, models / "face-landmarks")
    env = {
        **os.environ,
        "MUSETALK_MODELS_DIR": str(models),
        "MUSETALK_PYTHON": sys.executable,
        "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
        "PYTHONPATH": str(REPO),
    }
    env.pop("CI", None)
    env.pop("MUSETALK_OFFLINE", None)
    proc = subprocess.run(
        ["bash", str(REPO / "download_weights.sh"), "--required-only"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    failed = [line for line in out.splitlines() if line.startswith("could not fetch")]
    required_hub = [f for f in HUB_FILES if f.required]
    assert len(failed) == len(required_hub), out
    assert all("is unreachable" in line for line in failed), out
    assert "present  required face-landmarks/face_landmark.tflite" in out
    assert "pip install" not in out + proc.stderr
    assert "fetch them later with: bash download_weights.sh" in out


def test_check_command_exit_codes(hub, tmp_path, capsys):
    assert weights.main(["check", "--models-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "missing  required musetalkV15/unet.pth" in out and "without it:" in out


# --------------------------------------------------------------------------- Piper voice (optional)
PIPER_FILES = [f for f in HUB_FILES if f.target.startswith(f"{weights.PIPER_DIR}/")]
PIPER_WITHOUT = "Piper voice for tts.service: piper (a local neural voice); without it use espeak"


def test_the_piper_voice_is_an_optional_hub_set():
    assert [(f.target, f.repo, f.filename, f.required, f.without) for f in PIPER_FILES] == [
        ("piper/en_US-lessac-medium.onnx", "rhasspy/piper-voices", "en/en_US/lessac/medium/en_US-lessac-medium.onnx",
         False, PIPER_WITHOUT),
        ("piper/en_US-lessac-medium.onnx.json", "rhasspy/piper-voices",
         "en/en_US/lessac/medium/en_US-lessac-medium.onnx.json", False, PIPER_WITHOUT),
    ]  # fmt: skip
    assert weights.PIPER_VOICE == "en_US-lessac-medium"


def test_check_reports_the_piper_voice_missing_and_the_required_set_whole(tmp_path, landmarks_dir, capsys):
    models = tmp_path / "models"
    shutil.copytree(landmarks_dir, models / "face-landmarks")
    for spec in HUB_FILES:
        if spec.required:
            (models / spec.target).parent.mkdir(parents=True, exist_ok=True)
            (models / spec.target).write_bytes(content_for(spec))
    states = {s.spec.target: s for s in weights.check(models)}
    assert [states[f.target].state for f in PIPER_FILES] == ["missing", "missing"]
    assert all(s.ok for s in states.values() if s.spec.required)
    assert weights.main(["check", "--models-dir", str(models)]) == 0
    out = capsys.readouterr().out
    for spec in PIPER_FILES:
        assert f"missing  optional {spec.target}" in out and f"without it: {PIPER_WITHOUT}" in out
    assert "all required weights are present" in out


def test_the_piper_voice_is_fetched_where_pipecat_loads_it_without_a_download(hub, tmp_path):
    report = weights.fetch(tmp_path, PIPER_FILES, options=options(hub))
    assert report.errors == [] and sorted(report.fetched) == [f.target for f in PIPER_FILES]
    for spec in PIPER_FILES:
        assert (tmp_path / spec.target).read_bytes() == hub.files[f"{spec.repo}/{spec.filename}"]
        assert ("HEAD", f"/rhasspy/piper-voices/resolve/main/{spec.filename}", None) in hub.requests
    state = weights.read_state(tmp_path)
    assert (
        state["piper/en_US-lessac-medium.onnx"]["sha256"] and state["piper/en_US-lessac-medium.onnx.json"]["git_sha1"]
    )
    # PiperTTSService(download_dir=D, voice V) downloads only when D/V.onnx is missing; PiperVoice reads V.onnx.json
    download_dir = tmp_path / weights.PIPER_DIR
    assert (download_dir / f"{weights.PIPER_VOICE}.onnx").is_file()
    assert (download_dir / f"{weights.PIPER_VOICE}.onnx.json").is_file()
    assert all(s.ok for s in weights.check(tmp_path, PIPER_FILES, verify=True))


def test_a_hub_without_the_piper_voice_fails_only_the_piper_lines(tmp_path):
    with HubStandIn() as server:
        for spec in HUB_FILES:
            if spec not in PIPER_FILES:
                server.add(spec.repo, spec.filename, content_for(spec))
        report = weights.fetch(tmp_path, HUB_FILES, options=options(server))
    assert report.missing_required == []
    assert len(report.errors) == len(PIPER_FILES), report.errors
    for spec, line in zip(PIPER_FILES, report.errors):
        assert line.startswith(f"could not fetch {spec.target} (rhasspy/piper-voices/{spec.filename})"), line
        assert "unreachable" not in line and "\n" not in line
