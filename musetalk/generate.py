"""Lip-sync generation: per-frame audio windows + a prepared avatar -> video frames.

The model step (UNet + VAE decode) runs batched on the models' device; blending runs
on the CPU in a worker thread so it overlaps the next batch's model step. Blending
touches only each frame's crop box: every pixel outside it is the avatar frame's own.

Frames are byte-identical to MuseTalk's own real-time loop (`musetalk.bench.official.official_loop`)
given the same weights, device, thread count and batch size, with or without the default
speed-ups of `musetalk.accel.optimize_for_inference` (`tests/test_generate_exact.py`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import cv2
import numpy as np
import torch
from PIL import Image

from musetalk.audio import positional_encoding
from musetalk.avatar.store import Avatar
from musetalk.latents import decode_latents
from musetalk.models import Models


def blend_face(
    frame: np.ndarray, face: np.ndarray, box: Sequence[int], crop_box: Sequence[int], mask: np.ndarray
) -> np.ndarray:
    """Paste a generated face into a copy of `frame`, alpha-blended with `mask`, inside `crop_box` only.

    `frame (H, W, 3) uint8`, `face (256, 256, 3) uint8`, `mask (ch, cw) uint8` at crop size.
    Pixel values equal MuseTalk's full-frame PIL composite; the work is limited to the crop.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    cx0, cy0, cx1, cy1 = (int(v) for v in crop_box)
    out = frame.copy()
    region = out[cy0:cy1, cx0:cx1]
    pasted = region.copy()
    pasted[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0] = cv2.resize(face, (x1 - x0, y1 - y0))
    base = Image.fromarray(region)
    base.paste(Image.fromarray(pasted), (0, 0), Image.fromarray(mask))
    region[:] = np.asarray(base)
    return out


@torch.inference_mode()
def model_step(
    models: Models, latents: torch.Tensor, features: torch.Tensor, pe: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """The UNet step and VAE decode, the one implementation every path uses.

    `latents (B, 8, 32, 32)` and `pe (1, 50, D)` on the models' device and dtype, `features (B, 50, D)`
    anywhere -> `(B, 256, 256, 3) uint8` faces on the device. Rows may come from different avatars.
    """
    audio = features.to(models.device, models.dtype, non_blocking=True) + pe
    pred = models.unet(latents, timestep, encoder_hidden_states=audio).sample
    return decode_latents(models.vae, pred)


def compose_frame(avatar: Avatar, position: int, face: np.ndarray) -> np.ndarray:
    """Blend one generated `face (256, 256, 3) uint8` into the avatar frame at loop `position`."""
    i = avatar.frame_index(position)
    return blend_face(avatar.frames[i], face, avatar.boxes[i], avatar.crop_boxes[i], avatar.masks[i])


def _copy_to_host(faces: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Start an asynchronous device-to-host copy into pinned memory; the event marks its end."""
    host = torch.empty(faces.shape, dtype=faces.dtype, pin_memory=True)
    host.copy_(faces, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class LipSyncGenerator:
    """Generates frames of one avatar; one instance per avatar, used from one thread at a time.

    `positions` are places in the avatar's ping-pong loop: the caller advances them so
    speech and idle video continue the same loop without a jump.
    """

    def __init__(self, models: Models, avatar: Avatar, *, batch_size: int | None = None):
        self.models = models
        self.avatar = avatar
        self.device = models.device
        self.dtype = models.dtype
        self.batch_size = batch_size or (16 if self.device.type == "cuda" else 4)
        self._latents = avatar.latents.to(self.device, self.dtype)  # preloaded: no per-frame copies
        self._pe = positional_encoding(50, models.audio_dim).to(self.device, self.dtype)
        self._timestep = torch.zeros(1, device=self.device, dtype=torch.long)
        self._blender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="musetalk-blend")

    def close(self) -> None:
        self._blender.shutdown(wait=True)

    # -------------------------------------------------------------- model step
    @torch.inference_mode()
    def infer_faces(self, positions: Sequence[int], features: torch.Tensor) -> torch.Tensor:
        """UNet + VAE decode for one batch: `features (B, 50, D)` -> `(B, 256, 256, 3) uint8` on device."""
        index = torch.as_tensor([self.avatar.frame_index(p) for p in positions], device=self.device)
        latents = self._latents.index_select(0, index)
        return model_step(self.models, latents, features, self._pe, self._timestep)

    # -------------------------------------------------------------- CPU step
    def compose(self, position: int, face: np.ndarray) -> np.ndarray:
        """Blend one generated face into the avatar frame at `position` of the loop."""
        return compose_frame(self.avatar, position, face)

    def _compose_batch(self, positions: Sequence[int], faces: torch.Tensor) -> list[np.ndarray]:
        faces_np = faces.cpu().numpy()
        return [self.compose(p, f) for p, f in zip(positions, faces_np)]

    def idle_frame(self, position: int) -> np.ndarray:
        """The avatar's own frame at `position`: no model work (silence)."""
        return self.avatar.frames[self.avatar.frame_index(position)]

    # -------------------------------------------------------------- pipeline
    def generate(self, features: torch.Tensor, start_position: int = 0) -> Iterator[np.ndarray]:
        """`features (T, 50, D)` -> T frames in order, model step of batch k+1 overlapping blending of batch k.

        On CUDA each batch's faces are copied to pinned host memory right behind its decode,
        so the blending thread never waits on a later batch's kernels.
        """
        pending: deque[Future[list[np.ndarray]]] = deque()
        total = features.shape[0]
        for start in range(0, total, self.batch_size):
            stop = min(start + self.batch_size, total)
            positions = list(range(start_position + start, start_position + stop))
            faces = self.infer_faces(positions, features[start:stop])
            if faces.device.type == "cuda":
                pending.append(self._blender.submit(self._compose_when_copied, positions, *_copy_to_host(faces)))
            else:
                pending.append(self._blender.submit(self._compose_batch, positions, faces))
            while len(pending) > 1:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()

    def _compose_when_copied(
        self, positions: Sequence[int], host: torch.Tensor, copied: torch.cuda.Event
    ) -> list[np.ndarray]:
        copied.synchronize()
        return self._compose_batch(positions, host)

    def generate_batch(self, positions: Sequence[int], features: torch.Tensor) -> list[np.ndarray]:
        """One batch, synchronously (the live bot calls this from its worker thread)."""
        return self._compose_batch(positions, self.infer_faces(positions, features))
