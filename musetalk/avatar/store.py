"""The avatar store: `avatars/<name>/` folders written atomically and checked on load.

Layout of one avatar (N unique frames; the idle/generation loop plays them as a
ping-pong cycle 0..N-1, N-1..0 so it loops without a jump):

    manifest.json        format + model version, fps, sizes, source, parameters, created, disk size
    frames/00000.png     (H, W, 3) RGB frames, lossless
    masks/00000.png      (ch, cw) uint8 blend mask at crop-box size
    boxes.npy            (N, 4) int32 face boxes (x0, y0, x1, y1), extra margin included
    crop_boxes.npy       (N, 4) int32 square blend regions
    latents.npy          (N, 8, 32, 32) float32: masked + reference VAE latents
    thumbnail.jpg        first frame, small, for listings

A new avatar is written to a hidden temp folder beside the others and renamed into
place only when complete, so a crash or kill leaves either the old avatar or none.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from loguru import logger

from musetalk.config import MODEL_VERSION
from musetalk.errors import AvatarError

if TYPE_CHECKING:
    import torch  # loaded with an avatar's latents only: `list` and `delete` start without it

# 2: official MuseTalk v1.5 preprocessing (DWPose landmarks when present, truncated landmark
#    coordinates, masks computed on the whole blending square, cone-kernel jaw masks).
# 1: earlier rules (rounded landmarks, clamped crops). Same files, so both load and render;
#    re-preparing (`python -m musetalk reprepare NAME`) rebuilds one with the current rules.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


def validate_name(name: str) -> str:
    """Avatar names become folder names: letters, digits, `_` and `-` only, at most 64."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise AvatarError(
            f"Invalid avatar name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit."
        )
    return name


def ping_pong(n: int) -> np.ndarray:
    """Cycle order over n unique frames: forward then backward, `(2n,) int`."""
    return np.concatenate([np.arange(n), np.arange(n)[::-1]])


@dataclass(frozen=True)
class AvatarManifest:
    name: str
    fps: int
    frame_count: int
    frame_size: tuple[int, int]  # (width, height)
    source_video: str
    preparation: dict[str, Any]
    created: str
    disk_bytes: int = 0
    cycle: str = "ping-pong"
    format_version: int = FORMAT_VERSION
    model_version: str = MODEL_VERSION
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: Path) -> AvatarManifest:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise AvatarError(f"{path} is unreadable ({exc}); delete this avatar and prepare it again.") from exc
        version = data.get("format_version")
        if version not in READABLE_FORMATS:
            raise AvatarError(
                f"Avatar {path.parent.name} was written in format {version}, this version reads "
                f"{', '.join(map(str, READABLE_FORMATS))}: prepare it again."
            )
        if data.get("model_version") != MODEL_VERSION:
            raise AvatarError(
                f"Avatar {path.parent.name} was prepared for MuseTalk {data.get('model_version')}, not {MODEL_VERSION}: prepare it again."
            )
        try:
            data["frame_size"] = tuple(data["frame_size"])
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise AvatarError(f"{path} is incomplete ({exc}); prepare this avatar again.") from exc


@dataclass
class Avatar:
    """A prepared avatar in memory; read-only once loaded, shared by generator threads."""

    manifest: AvatarManifest
    frames: list[np.ndarray]  # N x (H, W, 3) uint8 RGB
    masks: list[np.ndarray]  # N x (ch, cw) uint8
    boxes: np.ndarray  # (N, 4) int32
    crop_boxes: np.ndarray  # (N, 4) int32
    latents: torch.Tensor  # (N, 8, 32, 32) float32
    cycle: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.cycle = ping_pong(len(self.frames))

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def size(self) -> tuple[int, int]:
        return self.manifest.frame_size

    def frame_index(self, position: int) -> int:
        """Unique frame shown at loop position `position` (any integer, wraps around)."""
        return int(self.cycle[position % len(self.cycle)])


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _write_png(path: Path, rgb_or_gray: np.ndarray) -> None:
    img = rgb_or_gray if rgb_or_gray.ndim == 2 else cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise AvatarError(f"Could not write {path} (disk full or not writable?).")


def _read_png(path: Path, gray: bool = False) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    if img is None:
        raise AvatarError(f"{path} is missing or corrupt; prepare this avatar again.")
    return img if gray else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class DamagedAvatar:
    """An avatar folder that cannot be loaded, and why (for the library list and the CLI)."""

    name: str
    reason: str


class AvatarStore:
    """All avatars under one root folder (`MUSETALK_AVATARS_DIR`, default `./avatars`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()

    # ---------------------------------------------------------------- housekeeping
    def _recover(self) -> None:
        """Undo what an interrupted write left behind: stale temp folders, half-swapped replacements."""
        for entry in self.root.iterdir():
            if entry.name.startswith(_TMP_PREFIX):
                parts = entry.name[len(_TMP_PREFIX) :].rsplit("-", 2)
                pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else -1
                if pid != os.getpid() and not _pid_alive(pid):
                    logger.info("Removing unfinished avatar preparation {}", entry.name)
                    shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith(_OLD_PREFIX):
                name = entry.name[len(_OLD_PREFIX) :].rsplit("-", 1)[0]
                target = self.root / name
                if target.exists():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    os.replace(entry, target)

    def path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / "manifest.json").is_file()

    def names(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if _NAME_RE.fullmatch(p.name) and (p / "manifest.json").is_file()
        )

    def manifest(self, name: str) -> AvatarManifest:
        path = self.path(name) / "manifest.json"
        if not path.is_file():
            raise AvatarError(self._missing_message(name))
        return _with(AvatarManifest.from_file(path), name=name)

    def list(self) -> list[AvatarManifest]:
        """Manifests of every readable avatar (unreadable ones are logged and skipped)."""
        out = []
        for name in self.names():
            try:
                out.append(self.manifest(name))
            except AvatarError as exc:
                logger.warning("Skipping avatar {}: {}", name, exc)
        return out

    def damaged(self) -> list[DamagedAvatar]:
        """Avatar folders that cannot be used (no or unreadable manifest), with why: the library
        lists them so an operator can see and delete them instead of meeting them in errors."""
        out = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and _NAME_RE.fullmatch(p.name)):
            if not (folder / "manifest.json").is_file():
                out.append(DamagedAvatar(folder.name, "its manifest.json is missing (an unfinished or damaged folder)"))
                continue
            try:
                self.manifest(folder.name)
            except AvatarError as exc:
                out.append(DamagedAvatar(folder.name, str(exc)))
        return out

    def _missing_message(self, name: str) -> str:
        known = ", ".join(self.names()) or "none yet"
        return f"No avatar named {name!r} in {self.root} (prepared avatars: {known}). Prepare it first."

    # ---------------------------------------------------------------- read
    def load(self, name: str) -> Avatar:
        """Load and check an avatar; any inconsistency is an `AvatarError` telling to re-prepare."""
        folder = self.path(name)
        manifest = self.manifest(name)
        n = manifest.frame_count
        import torch

        try:
            boxes = np.load(folder / "boxes.npy")
            crop_boxes = np.load(folder / "crop_boxes.npy")
            latents = torch.from_numpy(np.load(folder / "latents.npy"))
        except (OSError, ValueError) as exc:
            raise AvatarError(f"Avatar {name} is damaged ({exc}); prepare it again.") from exc
        # PNG decoding releases the GIL: a bot's start (which loads its avatar) scales with the cores.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="avatar-load") as pool:
            frames = list(pool.map(_read_png, [folder / "frames" / f"{i:05d}.png" for i in range(n)]))
            masks = list(
                pool.map(functools.partial(_read_png, gray=True), [folder / "masks" / f"{i:05d}.png" for i in range(n)])
            )
        w, h = manifest.frame_size
        if boxes.shape != (n, 4) or crop_boxes.shape != (n, 4) or tuple(latents.shape) != (n, 8, 32, 32):
            raise AvatarError(f"Avatar {name} has inconsistent arrays for {n} frames; prepare it again.")
        for i, (frame, mask, cb) in enumerate(zip(frames, masks, crop_boxes)):
            if frame.shape != (h, w, 3) or mask.shape != (cb[3] - cb[1], cb[2] - cb[0]):
                raise AvatarError(f"Avatar {name}: frame {i} does not match its manifest; prepare it again.")
        return Avatar(manifest, frames, masks, boxes.astype(np.int32), crop_boxes.astype(np.int32), latents.float())

    # ---------------------------------------------------------------- write
    def write(
        self,
        manifest: AvatarManifest,
        frames: list[np.ndarray],
        masks: list[np.ndarray],
        boxes: np.ndarray,
        crop_boxes: np.ndarray,
        latents: torch.Tensor,
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> AvatarManifest:
        """Write a complete avatar atomically, replacing one of the same name if it exists."""
        name = validate_name(manifest.name)
        tmp = self.root / f"{_TMP_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            (tmp / "frames").mkdir()
            (tmp / "masks").mkdir()
            for i, (frame, mask) in enumerate(zip(frames, masks, strict=True)):
                _write_png(tmp / "frames" / f"{i:05d}.png", frame)
                _write_png(tmp / "masks" / f"{i:05d}.png", mask)
                if on_progress is not None:
                    on_progress(i + 1, len(frames))
            np.save(tmp / "boxes.npy", np.asarray(boxes, dtype=np.int32))
            np.save(tmp / "crop_boxes.npy", np.asarray(crop_boxes, dtype=np.int32))
            np.save(tmp / "latents.npy", latents.detach().float().cpu().numpy())
            thumb = frames[0]
            scale = 256 / max(thumb.shape[:2])
            thumb = cv2.resize(thumb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(tmp / "thumbnail.jpg"), cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR))
            manifest = _with(manifest, disk_bytes=_dir_size(tmp))
            (tmp / "manifest.json").write_text(manifest.to_json(), encoding="utf-8")
            self._swap_in(tmp, name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _with(manifest, disk_bytes=_dir_size(self.root / name))

    def _swap_in(self, tmp: Path, name: str) -> None:
        target = self.root / name
        if target.exists():
            old = self.root / f"{_OLD_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)

    def delete(self, name: str) -> None:
        folder = self.path(name)
        if not folder.exists():
            raise AvatarError(self._missing_message(name))
        trash = self.root / f"{_TMP_PREFIX}{name}-deleted-{uuid.uuid4().hex[:8]}"
        os.replace(folder, trash)  # disappears from listings at once, even if removal is slow
        shutil.rmtree(trash, ignore_errors=True)

    def rename(self, old: str, new: str) -> AvatarManifest:
        src, dst = self.path(old), self.path(new)
        if not self.exists(old):
            raise AvatarError(self._missing_message(old))
        if dst.exists():
            raise AvatarError(f"An avatar named {new!r} already exists; delete it or pick another name.")
        os.replace(src, dst)  # the folder name is the avatar's name; the manifest follows it
        manifest = self.manifest(new)
        tmp_manifest = dst / ".manifest.json.tmp"
        tmp_manifest.write_text(manifest.to_json(), encoding="utf-8")
        os.replace(tmp_manifest, dst / "manifest.json")
        return manifest

    def thumbnail(self, name: str) -> Path:
        return self.path(name) / "thumbnail.jpg"


def _with(manifest: AvatarManifest, **changes: Any) -> AvatarManifest:
    data = asdict(manifest)
    data.update(changes)
    data["frame_size"] = tuple(data["frame_size"])
    return AvatarManifest(**data)


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()
