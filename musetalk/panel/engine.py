"""What the panel shares between browser sessions and API callers (one per process); no Gradio.

Models load once, in a background thread; every action waits for them, and when weights are
missing it says which and how to fetch them. Weights can be fetched from here too (the
System tab's button, or at start-up on a Hugging Face Space); when a fetch ends the models
load in the background, so nothing needs a restart. A failed load is retried at the next
action.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from loguru import logger

import musetalk
from musetalk import weights
from musetalk.avatar.preview import PreviewCache
from musetalk.avatar.store import AvatarStore
from musetalk.bot.agent_config import (
    BotConfig,
    KeyLookup,
    SpeechSetup,
    default_bot_config_path,
    load_bot_config,
    save_bot_config,
)
from musetalk.bot.manager import BotManager
from musetalk.bot.status import BotStatus
from musetalk.bot.transports import IceServerSpec, TransportSettings, is_loopback, with_page_key
from musetalk.bot.workers import make_bot_runner
from musetalk.config import FETCH_COMMAND, ModelPaths, RuntimeSettings
from musetalk.errors import AvatarError, ConfigError, MuseTalkError
from musetalk.models import Models, check_weights, load_models, resolve_runtime
from musetalk.serve.backend import INSTALL_HINT, BackendSpec, make_backend, ray_available

HISTORY_SECONDS = 300  # the live plots show the last 5 minutes
SOURCES_DIR = ".sources"  # inside the avatars folder: kept copies of uploaded videos (re-prepare)
_KEPT_STAMP = "%Y%m%d-%H%M%S"  # a kept copy is named <avatar>-<stamp><suffix>
STATUS_EVERY_S = 1.0
CLOSING_WAIT_S = 5.0  # at exit, how long a stopped bot may still take to leave its Daily room
MODEL_STATES = ("idle", "fetching", "loading", "ready", "error")


@dataclass(frozen=True)
class EngineOptions:
    """How the engine reaches the model hub and what it may do on its own."""

    fetch: weights.FetchOptions = weights.FetchOptions()
    fetch_at_start: bool = False  # fetch missing weights before the first load (Hugging Face Spaces)
    bot_config: Path | None = None  # say / conversation: the bot config file (None: configs/bot/conversation.yaml)
    keys: KeyLookup = field(default=lambda name: None, repr=False)  # api_key_env names -> keys (the environment)
    ice_servers: tuple[IceServerSpec, ...] = ()  # STUN/TURN servers for the local page (behind NAT)
    page_key: str | None = field(default=None, repr=False)  # local pages' viewer key (None: made if one is needed)
    max_bots: int = 4  # live bots running at once
    max_sessions: int | None = None  # live sessions at once, all bots together (None: the measured capacity)
    backend: str = "inproc"  # where frames are generated: inproc, ray or ray://HOST:PORT (musetalk/serve)

    def __post_init__(self) -> None:
        if self.max_bots < 1:
            raise ConfigError("--max-bots must be at least 1.")
        if self.max_sessions is not None and self.max_sessions < 1:
            raise ConfigError("--max-sessions must be at least 1.")
        if BackendSpec.parse(self.backend).kind == "ray" and not ray_available():
            raise ConfigError(f"--backend {self.backend} needs Ray, which is not installed here: {INSTALL_HINT}")


class Engine:
    """Models (fetched and loaded in the background), avatar store, bot runner, preview and kept sources."""

    def __init__(
        self, models_dir: Path, avatars_dir: Path, runtime: RuntimeSettings, options: EngineOptions | None = None
    ):
        self.paths = ModelPaths(Path(models_dir))
        self.store = AvatarStore(Path(avatars_dir))
        self.runtime = runtime
        self.options = options or EngineOptions()
        self.bot_config_path = Path(self.options.bot_config) if self.options.bot_config else None
        self._bot_config: BotConfig | None = None
        self._bot_config_error: str | None = None
        self.sources_dir = self.store.root / SOURCES_DIR
        self.render_dir = Path(tempfile.mkdtemp(prefix="musetalk-renders-"))
        self.registry = weights.build_registry()
        self.preview_cache = PreviewCache()  # the last clip previewed: slider moves re-render without decoding
        self._cond = threading.Condition()
        self._fetch_lock = threading.Lock()
        self._state = "idle"
        self._models: Models | None = None
        self._error: str | None = None
        self._fetch_progress: weights.Progress | None = None
        self._fetch_errors: list[str] = []
        self._runner: BotManager | None = None
        self._cancel: threading.Event | None = None
        self._active_sources: set[Path] = set()
        self._preparing: set[str] = set()  # avatars being prepared (again): the bot may not start them
        self._page_key: str | None = None  # made for the first local page served beyond loopback (page_key_for)
        self._history: deque[tuple[float, float | None, float | None]] = deque(
            maxlen=int(HISTORY_SECONDS / STATUS_EVERY_S)
        )
        self._last_sample = 0.0
        self.reload_bot_config()

    # ---------------------------------------------------------------- models
    def start_loading(self) -> None:
        """Load in the background; first fetch what is missing when `fetch_at_start` is set."""
        target = self._fetch_then_load if self.options.fetch_at_start else self._load
        threading.Thread(target=target, name="musetalk-model-loader", daemon=True).start()

    def _fetch_then_load(self) -> None:
        if not all(s.ok for s in self.weights_status()):
            try:
                self.fetch_weights()
            except MuseTalkError as exc:  # another fetch runs: it loads the models when done
                logger.warning("{}", exc)
                return
        self._load()

    def _load(self) -> None:
        with self._cond:
            if self._state in ("loading", "ready", "fetching"):
                return
            self._state = "loading"
        models, error = None, None
        try:
            models = load_models(self.paths, self.runtime)
        except MuseTalkError as exc:
            error = str(exc)
        except Exception as exc:  # a bug or a broken install: say so, keep the panel alive
            logger.opt(exception=exc).error("Loading the models failed")
            error = f"Loading the models failed ({type(exc).__name__}: {exc}). The panel's console has the details."
        with self._cond:
            self._models, self._error = models, error
            self._state = "ready" if models is not None else "error"
            self._cond.notify_all()
        if error:
            logger.warning("Models not loaded: {}", error)
        else:
            logger.info("Models ready ({})", models.describe())

    def wait_settled(self, timeout: float | None = None) -> None:
        """Return once no fetch or load is running (or after `timeout` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._state in ("loading", "fetching", "idle") and (deadline is None or time.monotonic() < deadline):
                self._cond.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _wait_busy(self) -> None:
        with self._cond:
            while self._state in ("loading", "fetching"):
                self._cond.wait()

    def models(self, on_wait: Callable[[], None] | None = None) -> Models:
        """The loaded models; waits while weights are fetched or models load; retries a failed load."""
        with self._cond:
            busy = self._state in ("loading", "fetching")
        if busy and on_wait is not None:
            on_wait()
        self._wait_busy()
        with self._cond:
            if self._state == "ready":
                return self._models
        self._load()
        self._wait_busy()
        with self._cond:
            if self._state == "ready":
                return self._models
            raise MuseTalkError(self._error or "The models are not loaded.")

    def model_state(self) -> tuple[str, str | None]:
        """(state, detail): the models' description when ready, the fetch progress, or the error."""
        with self._cond:
            if self._state == "fetching":
                return self._state, self._fetch_progress.describe() if self._fetch_progress else "starting"
            detail = self._models.describe() if self._models is not None else self._error
            return self._state, detail

    def model_problem(self, error: str | None) -> str:
        """One line on why the models are not loaded."""
        missing = check_weights(self.paths)
        if missing:
            return f"{len(missing)} required weight files are missing or empty in {self.paths.models_dir}."
        first = (error or "unknown error").strip().splitlines()[0].rstrip(":")
        return first if first.endswith(".") else first + "."

    # ---------------------------------------------------------------- weights
    def weights_status(self, *, verify: bool = False) -> list[weights.FileStatus]:
        return weights.check(self.paths.models_dir, self.registry, verify=verify)

    def fetch_errors(self) -> list[str]:
        with self._cond:
            return list(self._fetch_errors)

    def fetch_weights(self, progress: weights.ProgressFn | None = None) -> weights.FetchReport:
        """Fetch every missing or damaged file (one fetch at a time), then load the models in the background.

        Models already loaded are kept unless a required file changed and no bot is running;
        then they load again from the new files.
        """
        if not self._fetch_lock.acquire(blocking=False):
            raise MuseTalkError("Weights are being fetched already: watch the banner, it says when they are ready.")
        try:
            self._wait_busy()  # a load in progress ends first: its result decides what is reloaded
            with self._cond:
                previous = self._state
                self._state, self._fetch_progress, self._fetch_errors = "fetching", None, []

            def tick(p: weights.Progress) -> None:
                with self._cond:
                    self._fetch_progress = p
                if progress is not None:
                    progress(p)

            try:
                report = weights.fetch(self.paths.models_dir, self.registry, options=self.options.fetch, progress=tick)
            finally:
                with self._cond:
                    self._state = previous if previous in ("ready", "error") else "idle"
                    self._cond.notify_all()
            with self._cond:
                self._fetch_errors = list(report.errors)
            for line in report.errors:
                logger.warning("{}", line)
        finally:
            self._fetch_lock.release()
        self._reload_after(report)
        return report

    def _reload_after(self, report: weights.FetchReport) -> None:
        runner = self.existing_runner()
        with self._cond:
            if self._state == "ready" and report.fetched and (runner is None or not runner.running):
                self._state, self._models, self._runner = "idle", None, None
            reload = self._state in ("idle", "error")
        if reload:
            self.start_loading_now()

    def start_loading_now(self) -> None:
        threading.Thread(target=self._load, name="musetalk-model-loader", daemon=True).start()

    # ---------------------------------------------------------------- what bots speak with
    def reload_bot_config(self) -> None:
        """Read the bot config file; a broken one is kept as an error the Live tab shows (mirror bots still start)."""
        try:
            config, error = load_bot_config(self.bot_config_path), None
        except ConfigError as exc:
            config, error = None, str(exc)
            logger.warning("{}", exc)
        with self._cond:
            self._bot_config, self._bot_config_error = config, error

    def bot_config(self) -> BotConfig:
        """The configuration the next say / conversation bot starts with."""
        with self._cond:
            config, error = self._bot_config, self._bot_config_error
        if config is None:
            raise ConfigError(error or "No bot config is loaded.")
        return config

    def set_bot_config(self, config: BotConfig, *, save: bool = False) -> Path | None:
        """Use `config` for the next starts; with `save`, also write it to the bot config file (atomically)."""
        path = None
        if save:
            path = save_bot_config(config, self.bot_config_path or default_bot_config_path())
            config = dataclasses.replace(config, source=str(path))
        with self._cond:
            self._bot_config, self._bot_config_error = config, None
        return path

    def page_key_for(self, host: str) -> str | None:
        """The viewer key of a local page on `host`: the operator's (--page-key) on any host; else, beyond
        loopback, one made for this panel the first time and shared by all its pages; else (loopback) none."""
        if self.options.page_key:
            return self.options.page_key
        if is_loopback(host):
            return None
        with self._cond:
            if self._page_key is None:
                self._page_key = with_page_key(TransportSettings(kind="local", host=host)).page_key
            return self._page_key

    @property
    def page_key(self) -> str | None:
        """The key the panel's page links carry (None while no local page needs one)."""
        with self._cond:
            return self.options.page_key or self._page_key

    def speech_secrets(self) -> list[str]:
        """The keys the current bot config points at (to scrub from any message)."""
        with self._cond:
            config = self._bot_config
        if config is None:
            return []
        return SpeechSetup(config, self.options.keys).secrets()

    def speech_setup(self) -> SpeechSetup:
        return SpeechSetup(self.bot_config(), self.options.keys, self.paths.models_dir)

    # ---------------------------------------------------------------- bot
    def runner(self, on_wait: Callable[[], None] | None = None) -> BotManager:
        models = self.models(on_wait)
        with self._cond:
            if self._runner is None:
                from musetalk.live.service import ServiceSettings

                service = make_backend(
                    self.options.backend, models=models, models_dir=self.paths.models_dir, runtime=self.runtime,
                    settings=ServiceSettings(max_sessions=self.options.max_sessions),
                )  # fmt: skip
                # On `ray`, every bot is a worker process of its own (musetalk/bot/workers.py).
                self._runner = make_bot_runner(models, service, backend=self.options.backend,
                                               max_bots=self.options.max_bots)  # fmt: skip
            return self._runner

    def existing_runner(self) -> BotManager | None:
        with self._cond:
            return self._runner

    def bot_status(self) -> BotStatus:
        runner = self.existing_runner()
        status = runner.status() if runner is not None else BotStatus()
        self._sample(status)
        return status

    def _sample(self, status: BotStatus) -> None:
        """Keep about one (uptime, fps, latency) point per second while the bot runs."""
        if status.state != "running":
            return
        now = time.monotonic()
        with self._cond:
            if now - self._last_sample < STATUS_EVERY_S * 0.9:
                return
            self._last_sample = now
            self._history.append((status.uptime_s, status.fps, status.mouth_latency_ms))

    def history(self) -> list[tuple[float, float | None, float | None]]:
        with self._cond:
            return list(self._history)

    def clear_history(self) -> None:
        with self._cond:
            self._history.clear()
            self._last_sample = 0.0

    def shutdown(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
        runner = self.existing_runner()
        if runner is not None:
            runner.stop_all()
            runner.service.close()
            if not runner.join_closing(CLOSING_WAIT_S):
                logger.warning(
                    "A stopped bot was still closing its connection after {} s; exiting anyway", CLOSING_WAIT_S
                )
        shutil.rmtree(self.render_dir, ignore_errors=True)

    def new_render_path(self, avatar: str) -> Path:
        """Where the next render goes; renders older than an hour are removed (Gradio keeps its own copy)."""
        cutoff = time.time() - 3600
        for old in self.render_dir.glob("*.mp4"):
            if old.stat().st_mtime < cutoff:
                old.unlink(missing_ok=True)
        return self.render_dir / f"{avatar}-{time.strftime('%Y%m%d-%H%M%S')}.mp4"

    # ---------------------------------------------------------------- library guards
    def avatar_in_use(self, name: str) -> str | None:
        """A sentence naming the bot that uses avatar `name` (starting, running or stopping), or None."""
        runner = self.existing_runner()
        return runner.avatar_in_use(name) if runner is not None else None

    def refuse_if_in_use(self, name: str, action: str) -> None:
        """Deleting, renaming or preparing again an avatar a bot uses would pull it from under the bot."""
        reason = self.avatar_in_use(name)
        if reason:
            raise AvatarError(
                f"Cannot {action} avatar {name!r}: {reason}. Stop the bot first (Live tab, Stop), then {action} it."
            )

    def begin_preparing(self, name: str, action: str) -> None:
        """Mark `name` as being prepared; refused while a bot uses it. Pair with `end_preparing`."""
        with self._cond:
            self.refuse_if_in_use(name, action)
            self._preparing.add(name)

    def end_preparing(self, name: str) -> None:
        with self._cond:
            self._preparing.discard(name)

    def refuse_if_preparing(self, name: str) -> None:
        """The bot may not start an avatar whose folder a preparation is about to replace."""
        with self._cond:
            busy = name in self._preparing
        if busy:
            raise AvatarError(
                f"Avatar {name!r} is being prepared right now: start the bot once the preparation ends "
                "(or cancel it in the Avatars tab)."
            )

    def delete_avatar(self, name: str) -> Path | None:
        """Delete an avatar (readable or damaged) unless a bot uses it; the copy of its source video
        kept for re-preparing goes too when no other avatar uses it. Returns that copy's path if removed."""
        self.refuse_if_in_use(name, "delete")
        source = self.kept_source(name)
        self.store.delete(name)
        self.prune_sources()
        return source if source is not None and not source.exists() else None

    def kept_source(self, name: str) -> Path | None:
        """The copy of the avatar's source video kept beside the avatars (None when there is none)."""
        try:
            recorded = self.store.manifest(name).source_video
        except AvatarError:  # damaged: find the copy by the name it was kept under
            matches = sorted(p for p in self._source_files() if _kept_under(name).fullmatch(p.name))
            return matches[-1] if matches else None
        if not recorded:
            return None
        path = Path(recorded)
        inside = path.resolve().parent == self.sources_dir.resolve()
        return path if inside and path.is_file() else None

    def source_deleted_with(self, name: str) -> Path | None:
        """The kept source video that deleting `name` would remove (None: none, or another avatar uses it)."""
        source = self.kept_source(name)
        if source is None:
            return None
        others = {Path(m.source_video).resolve() for m in self.store.list() if m.name != name and m.source_video}
        return None if source.resolve() in others else source

    def _source_files(self) -> list[Path]:
        if not self.sources_dir.is_dir():
            return []
        return [p for p in self.sources_dir.iterdir() if p.is_file()]

    # ---------------------------------------------------------------- preparation
    def new_cancel(self) -> threading.Event:
        self._cancel = threading.Event()
        return self._cancel

    def cancel_preparation(self) -> bool:
        event = self._cancel
        if event is None or event.is_set():
            return False
        event.set()
        return True

    def keep_source(self, video: Path, name: str) -> Path:
        """A copy of an uploaded video beside the avatars, so re-preparing works after the upload is gone."""
        video = Path(video)
        if video.parent.resolve() == self.sources_dir.resolve():
            kept = video
        else:
            self.sources_dir.mkdir(parents=True, exist_ok=True)
            kept = self.sources_dir / f"{name}-{time.strftime(_KEPT_STAMP)}{video.suffix.lower() or '.mp4'}"
            shutil.copyfile(video, kept)
        with self._cond:
            self._active_sources.add(kept.resolve())
        return kept

    def release_source(self, kept: Path) -> None:
        with self._cond:
            self._active_sources.discard(kept.resolve())
        self.prune_sources()

    def prune_sources(self) -> None:
        """Delete kept videos that no avatar refers to any more (and no preparation is using).

        A damaged avatar's copy is kept (found by the name it was kept under): its manifest cannot
        say which it is, and the video is what preparing it again needs. Deleting the avatar frees it.
        """
        used = {Path(m.source_video).resolve() for m in self.store.list()}
        damaged = [_kept_under(d.name) for d in self.store.damaged()]
        with self._cond:
            used |= self._active_sources
        for path in self._source_files():
            if path.resolve() not in used and not any(pattern.fullmatch(path.name) for pattern in damaged):
                path.unlink(missing_ok=True)

    # ---------------------------------------------------------------- system facts
    def system_info(self) -> dict[str, Any]:
        """Device, GPU, versions, weight files (present / missing / damaged), folders."""
        statuses = self.weights_status()
        missing = check_weights(self.paths, include_optional=True)
        state, detail = self.model_state()
        states = {
            "ready": f"ready: {detail}",
            "error": f"not loaded: {self.model_problem(detail)}",
            "fetching": f"fetching weights: {detail}",
        }
        return {
            "device": _device_text(self.runtime),
            "gpu": _gpu_text(),
            "models_state": states.get(state, state),
            "models_dir": str(self.paths.models_dir.resolve()),
            "avatars_dir": str(self.store.root.resolve()),
            "avatar_count": len(self.store.names()),
            "versions": _versions(),
            "weights": _weight_parts(statuses),
            "weight_files": [s.to_dict() for s in statuses],
            "missing": missing,
            "fetch_errors": self.fetch_errors(),
            "fetch_command": FETCH_COMMAND,
        }


def _kept_under(name: str) -> re.Pattern[str]:
    """The file names `keep_source` gives the copies kept for avatar `name`."""
    return re.compile(rf"{re.escape(name)}-\d{{8}}-\d{{6}}\.[A-Za-z0-9]+")


def _weight_parts(statuses: list[weights.FileStatus]) -> list[dict[str, Any]]:
    """One row per weight set (UNet, VAE, ...): present when each of its files is."""
    parts: dict[str, dict[str, Any]] = {}
    for s in statuses:
        folder = str(s.path.parent)
        part = parts.setdefault(
            folder, {"part": _PART_LABELS.get(Path(s.spec.target).parts[0], s.spec.part), "folder": folder,
                     "required": s.spec.required, "present": True},
        )  # fmt: skip
        part["present"] = part["present"] and s.ok
    return list(parts.values())


_PART_LABELS = MappingProxyType(
    {
        "musetalkV15": "MuseTalk v1.5 UNet",
        "sd-vae": "SD VAE (ft-mse)",
        "whisper": "Whisper tiny (audio features)",
        "face-landmarks": "Face detector + landmarks",
        "face-parse-bisent": "BiSeNet face parsing (optional: jaw mask)",
        "dwpose": "DWPose landmarks (optional)",
        "piper": "Piper voice (optional: tts.service piper)",
    }
)


def _device_text(runtime: RuntimeSettings) -> str:
    try:
        device, dtype = resolve_runtime(runtime)
    except ConfigError as exc:
        return f"invalid: {exc}"
    return f"{device.type} {str(dtype).removeprefix('torch.')}"


def _gpu_text() -> str | None:
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    text = f"{props.name}: {props.total_memory / 2**30:.1f} GiB"
    try:
        free, _ = torch.cuda.mem_get_info(index)
        text += f" ({free / 2**30:.1f} GiB free)"
    except RuntimeError:  # some drivers refuse the query; the total is enough
        pass
    return text


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "musetalk": musetalk.__version__, "torch": torch.__version__}
    for dist in ("pipecat-ai", "gradio", "diffusers", "transformers", "huggingface_hub"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions
