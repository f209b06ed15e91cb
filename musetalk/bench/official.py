"""The reference: MuseTalk's real-time loop, written out after its script (RGB kept).

UNet at batch 8, the full VAE decode with its numpy uint8 conversion, then the full-frame PIL
blend per frame, nothing overlapped. Our generator's frames are byte-identical to these
(`tests/test_generate_exact.py`); `musetalk.bench.speed` times both.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from musetalk.audio import positional_encoding
from musetalk.avatar.store import Avatar
from musetalk.bench.timing import StageTimer
from musetalk.latents import VAE_SCALING_FACTOR
from musetalk.models import Models

OFFICIAL_BATCH = 8


def official_blend(
    frame: np.ndarray, face: np.ndarray, box: Sequence[int], crop_box: Sequence[int], mask: np.ndarray
) -> np.ndarray:
    """MuseTalk's full-frame PIL composite. `face` is already resized to the box.

    Body image of the whole frame; its crop-box crop gets the face pasted at the box; that crop
    is pasted back through the mask. (MuseTalk flips BGR<->RGB around this; every step works per
    channel, so RGB in gives the same bytes.)
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    cb = tuple(int(v) for v in crop_box)
    body = Image.fromarray(frame)
    face_large = body.crop(cb)
    face_large.paste(Image.fromarray(face), (x0 - cb[0], y0 - cb[1], x1 - cb[0], y1 - cb[1]))
    body.paste(face_large, cb[:2], Image.fromarray(mask).convert("L"))
    return np.array(body)


def official_decode(vae, latents: torch.Tensor) -> np.ndarray:
    """MuseTalk's `decode_latents` (RGB kept): `(B, 4, 32, 32)` -> `(B, 256, 256, 3) uint8` numpy."""
    latents = (1 / VAE_SCALING_FACTOR) * latents
    image = vae.decode(latents.to(vae.dtype)).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    image = image.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    return (image * 255).round().astype(np.uint8)


def official_loop(
    models: Models,
    avatar: Avatar,
    features: torch.Tensor,
    *,
    batch_size: int = OFFICIAL_BATCH,
    start_position: int = 0,
    timer: StageTimer | None = None,
) -> list[np.ndarray]:
    """The reference: MuseTalk's real-time loop, one batch after another, nothing overlapped.

    Per batch: the avatar's latents for these loop positions, audio windows + positional
    encoding, one UNet step at t=0, the VAE decode, then per frame `cv2.resize` of the face to
    its box and the full-frame PIL blend.
    """
    device, dtype = models.device, models.dtype
    pe = positional_encoding(50, models.audio_dim).to(device, dtype)
    timesteps = torch.tensor([0], device=device)
    timer = timer or StageTimer(device, enabled=False)
    out: list[np.ndarray] = []
    total = features.shape[0]
    for start in range(0, total, batch_size):
        idx = [avatar.frame_index(start_position + k) for k in range(start, min(start + batch_size, total))]
        with torch.no_grad():
            latent_batch = torch.cat([avatar.latents[i : i + 1] for i in idx]).to(device=device, dtype=dtype)
            audio = features[start : start + len(idx)].to(device, dtype) + pe
            pred = models.unet(latent_batch, timesteps, encoder_hidden_states=audio).sample
            faces = official_decode(models.vae, pred)
        with timer.cpu_stage("blend"):
            for i, face in zip(idx, faces):
                x0, y0, x1, y1 = (int(v) for v in avatar.boxes[i])
                resized = cv2.resize(face, (x1 - x0, y1 - y0))
                out.append(
                    official_blend(avatar.frames[i], resized, avatar.boxes[i], avatar.crop_boxes[i], avatar.masks[i])
                )
    return out
