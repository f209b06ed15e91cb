"""Avatars on replicas without a shared disk: packed by the caller, kept by content hash.

A bot holds its avatar in memory (`Avatar`). To reach a replica on another machine it is
packed into one blob (frames and masks as PNG, arrays as .npy, the manifest as JSON); the
blob's SHA-256 is the avatar's id everywhere (routing key, cache name), so two callers with
the same avatar share it and a changed avatar never meets a stale copy. A replica keeps the
blobs it received in a local cache folder (atomic writes) and, when a shared avatar folder
is configured, loads by name from there instead and never needs the bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import torch

from musetalk.avatar.store import Avatar, AvatarManifest
from musetalk.errors import AvatarError

DIGEST_CHARS = 32


def _png(image: np.ndarray) -> bytes:
    bgr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise AvatarError("an avatar frame could not be encoded as PNG")
    return data.tobytes()


def _unpng(data: bytes, gray: bool) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    if image is None:
        raise AvatarError("an avatar blob holds an unreadable image; send it again")
    return image if gray else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def pack_avatar(avatar: Avatar) -> bytes:
    """The avatar as one zip blob (stored, not compressed: PNGs are compressed already)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        # Fixed timestamps: the same avatar always packs to the same bytes (and the same digest).
        def put(name: str, data: bytes) -> None:
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)

        put("manifest.json", json.dumps(asdict(avatar.manifest), sort_keys=True).encode())
        put("boxes.npy", _npy(np.asarray(avatar.boxes, np.int32)))
        put("crop_boxes.npy", _npy(np.asarray(avatar.crop_boxes, np.int32)))
        put("latents.npy", _npy(avatar.latents.detach().cpu().float().numpy()))
        for i, (frame, mask) in enumerate(zip(avatar.frames, avatar.masks)):
            put(f"frames/{i:05d}.png", _png(frame))
            put(f"masks/{i:05d}.png", _png(mask))
    return buffer.getvalue()


def digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()[:DIGEST_CHARS]


def unpack_avatar(blob: bytes) -> Avatar:
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            data = json.loads(z.read("manifest.json"))
            data["frame_size"] = tuple(data["frame_size"])
            manifest = AvatarManifest(**data)
            n = manifest.frame_count
            frames = [_unpng(z.read(f"frames/{i:05d}.png"), gray=False) for i in range(n)]
            masks = [_unpng(z.read(f"masks/{i:05d}.png"), gray=True) for i in range(n)]
            boxes = np.load(io.BytesIO(z.read("boxes.npy")))
            crop_boxes = np.load(io.BytesIO(z.read("crop_boxes.npy")))
            latents = torch.from_numpy(np.load(io.BytesIO(z.read("latents.npy"))))
    except (KeyError, TypeError, ValueError, zipfile.BadZipFile) as exc:
        raise AvatarError(f"an avatar blob is damaged ({exc}); send it again") from exc
    return Avatar(manifest, frames, masks, boxes, crop_boxes, latents)


class PackedAvatars:
    """Caller side: each in-memory avatar packed once, by identity."""

    def __init__(self) -> None:
        self._by_object: dict[int, tuple[Avatar, str]] = {}
        self._blobs: dict[str, bytes] = {}
        self._names: dict[str, str] = {}

    def add(self, avatar: Avatar) -> str:
        known = self._by_object.get(id(avatar))
        if known is not None and known[0] is avatar:
            return known[1]
        blob = pack_avatar(avatar)
        key = digest(blob)
        self._by_object[id(avatar)] = (avatar, key)
        self._blobs[key] = blob
        self._names[key] = avatar.name
        return key

    def blob(self, key: str) -> bytes:
        return self._blobs[key]

    def name(self, key: str) -> str:
        return self._names[key]


class AvatarCache:
    """Replica side: blobs by digest in a local folder (atomic writes), verified on arrival."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        if len(key) != DIGEST_CHARS or not all(c in "0123456789abcdef" for c in key):
            raise AvatarError(f"{key!r} is not an avatar digest")
        return self.root / f"{key}.avatar"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, blob: bytes) -> None:
        if digest(blob) != key:
            raise AvatarError(f"avatar blob does not match its digest {key}; send it again")
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, key: str) -> Avatar:
        return unpack_avatar(self.path(key).read_bytes())
