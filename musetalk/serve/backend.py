"""Backend choice: `inproc` (one `GenerationService` in this process) or `ray[://ADDRESS]`.

`make_backend(spec, ...)` is the one place a backend is chosen: it returns a `GenerationBackend`
(musetalk/live/backend.py), so a bot or the panel takes either. Specs:

- `inproc` (default): a new `GenerationService` for the given models; Ray is not imported.
- `ray`: connect to the Ray cluster of this machine if one runs (`ray start --head`), else
  start a local one; deploy the MuseTalk app if it is not running yet.
- `ray://HOST:PORT`: a remote cluster through Ray Client (port 10001 of the head by default).
  The app must be deployed there (`serve deploy configs/serve/musetalk.yaml`) unless
  `models_dir` is given (a path valid on the cluster's nodes), which deploys it.

Errors: without Ray installed, a `BackendError` names what to install; an address that does
not answer fails within `connect_timeout_s` instead of hanging.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from musetalk.config import RuntimeSettings
from musetalk.errors import BackendError, ConfigError

if TYPE_CHECKING:  # imported where used: choosing a backend loads neither torch nor Ray
    from musetalk.live.backend import GenerationBackend
    from musetalk.live.service import ServiceSettings
    from musetalk.models import Models
    from musetalk.serve.client import RayGenerationClient

INSTALL_HINT = "pip install -r requirements-scale.txt  (Ray Serve; the default `inproc` backend needs none)"


@dataclass(frozen=True)
class BackendSpec:
    kind: str  # inproc | ray
    address: str | None = None  # ray://HOST:PORT, or None: this machine's cluster (started if absent)

    @classmethod
    def parse(cls, spec: str) -> BackendSpec:
        text = (spec or "inproc").strip()
        if text == "inproc":
            return cls("inproc")
        if text == "ray":
            return cls("ray")
        if text.startswith("ray://") and len(text) > len("ray://"):
            return cls("ray", text)
        raise ConfigError(f"backend must be 'inproc', 'ray' or 'ray://HOST:PORT', not {spec!r}.")


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 1  # when this process deploys the app
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs, else CPU replicas
    avatar_dir: str | None = None  # shared avatar folder on every node (optional)
    connect_timeout_s: float = 5.0  # nothing listening at the address
    join_timeout_s: float = 20.0  # listening, but the cluster does not let us in (e.g. token auth)
    num_cpus: int | None = None  # for a local cluster started here
    service: dict[str, Any] = field(default_factory=dict)


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None


def make_backend(
    spec: str = "inproc", *, models: Models | None = None, models_dir: str | Path | None = None,
    runtime: RuntimeSettings | None = None, settings: ServiceSettings | None = None, ray: RayOptions | None = None,
) -> GenerationBackend:  # fmt: skip
    """The generation backend for `spec` (see the module docstring); each call makes a new one."""
    parsed = BackendSpec.parse(spec)
    if parsed.kind == "inproc":
        if models is None:
            raise ConfigError("the inproc backend needs loaded models")
        from musetalk.live.service import GenerationService

        return GenerationService(models, settings)
    if not ray_available():
        raise BackendError(f"--backend {spec} needs Ray, which is not installed here. Install it with: {INSTALL_HINT}")
    return connect_ray(
        parsed.address, models_dir=models_dir, runtime=runtime, settings=settings, options=ray or RayOptions()
    )


def _probe(address: str, timeout: float) -> None:
    """Fail fast when nothing listens at ray://HOST:PORT (Ray itself would retry for a long time)."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address must look like ray://HOST:PORT, not {address!r}.")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise BackendError(
            f"No Ray cluster answers at {address} ({exc}). Start one with `ray start --head` on that machine "
            "(Ray Client listens on port 10001) or check the address."
        ) from exc


def _init_with_timeout(ray, kwargs: dict[str, Any], address: str | None, timeout: float) -> None:
    """`ray.init` in a helper thread (Ray Client retries a refused handshake for a long time) that then
    stays alive: measured here, the driver loses its cluster (GCS unreachable) once the thread that
    called `ray.init` ends, and the panel calls this from short-lived worker threads."""
    outcome: list[BaseException | None] = []
    done = threading.Event()

    def init_and_stay() -> None:
        outcome.append(_try(ray.init, kwargs))
        done.set()
        if outcome[0] is None:
            threading.Event().wait()  # the driver's thread lives as long as the process

    threading.Thread(target=init_and_stay, name="musetalk-ray-driver", daemon=True).start()
    done.wait(timeout)
    where = address or "this machine"
    if not outcome:
        raise BackendError(
            f"The Ray cluster at {where} did not let this process join within {timeout:.0f} s. If it uses token "
            "authentication (Ray's default for clusters started by `ray start`), set RAY_AUTH_MODE=token and give "
            "this machine the head's token (~/.ray/auth_token, or RAY_AUTH_TOKEN)."
        )
    if outcome[0] is not None:
        raise BackendError(f"Could not join the Ray cluster at {where}: {outcome[0]}") from outcome[0]


def _join_running_cluster(ray, kwargs: dict[str, Any], timeout: float) -> bool:
    """Join the cluster `ray start` runs on this machine, if any (False when there is none)."""
    try:
        _init_with_timeout(ray, {**kwargs, "address": "auto"}, "this machine", timeout)
    except BackendError as exc:
        if isinstance(exc.__cause__, ConnectionError):  # Ray's answer when no cluster runs here
            return False
        raise
    return True


def _try(fn, kwargs: dict[str, Any]) -> BaseException | None:
    try:
        fn(**kwargs)
    except BaseException as exc:  # handed to the caller's thread
        return exc
    return None


def connect_ray(
    address: str | None, *, models_dir: str | Path | None = None, runtime: RuntimeSettings | None = None,
    settings: ServiceSettings | None = None, options: RayOptions | None = None,
) -> RayGenerationClient:  # fmt: skip
    """Join (or start) the cluster, make sure the MuseTalk app runs, return a client for it."""
    import ray
    from ray import serve

    from musetalk.serve.client import RayGenerationClient
    from musetalk.serve.deployment import APP_NAME, ReplicaConfig, build

    opts = options or RayOptions()
    if address is not None:
        _probe(address, opts.connect_timeout_s)
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False}
        if address is not None:
            kwargs["address"] = address
            _init_with_timeout(ray, kwargs, address, opts.join_timeout_s)
        elif not _join_running_cluster(ray, kwargs, opts.join_timeout_s):
            # No cluster on this machine: start one here, on loopback (it serves this machine only), whose
            # workers run this checkout's code.
            root = str(Path(__file__).resolve().parents[2])
            kwargs.update(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": root}}
            if opts.num_cpus is not None:
                kwargs["num_cpus"] = opts.num_cpus
            _init_with_timeout(ray, kwargs, address, max(opts.join_timeout_s, 120.0))
    app = serve.status().applications.get(APP_NAME)
    state = str(getattr(app.status, "value", app.status)) if app is not None else "absent"
    if state not in ("RUNNING", "DEPLOYING"):
        if models_dir is None:
            detail = f" ({state}: {app.message})" if app is not None and app.message else f" ({state})"
            raise BackendError(
                f"The Ray cluster runs no healthy '{APP_NAME}' app{detail}. Deploy it with "
                "`serve deploy configs/serve/musetalk.yaml` or pass the models folder so this process deploys it."
            )
        rt = runtime or RuntimeSettings()
        service = dict(opts.service) or (asdict(settings) if settings is not None else {})
        config = ReplicaConfig(models_dir=str(Path(models_dir).resolve()), device=rt.device, dtype=rt.dtype,
                               service=service, avatar_dir=opts.avatar_dir)  # fmt: skip
        logger.info("Deploying MuseTalk on Ray: {} replica(s) from {}", opts.replicas, config.models_dir)
        app = build(config, replicas=opts.replicas, gpus=opts.gpus_per_replica)
        serve.run(app, name=APP_NAME, route_prefix=None, blocking=False)
    return RayGenerationClient(serve.get_app_handle(APP_NAME))
