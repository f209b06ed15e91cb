"""VAE conversions between 256x256 face crops and MuseTalk latents (one implementation each)."""

from __future__ import annotations

import numpy as np
import torch

from musetalk.models import VAE_SCALING_FACTOR

FACE_SIZE = 256


@torch.inference_mode()
def encode_crops(vae, crops: np.ndarray, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """`(B, 256, 256, 3) uint8` RGB face crops -> `(B, 8, 32, 32) float32` UNet input latents.

    Channels 0-3: the crop with its lower half blanked (what the UNet inpaints);
    channels 4-7: the full crop as reference. Latents are sampled from the posterior,
    as MuseTalk does, with a seeded generator so preparation is reproducible.
    """
    device, dtype = vae.device, vae.dtype
    x = torch.from_numpy(np.ascontiguousarray(crops)).to(device).permute(0, 3, 1, 2).float() / 255.0
    masked = x.clone()
    masked[:, :, FACE_SIZE // 2 :, :] = 0.0
    both = torch.cat([masked, x], dim=0) * 2.0 - 1.0  # [0,1] -> [-1,1]
    dist = vae.encode(both.to(dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, device=generator.device if generator else "cpu")
    latents = (dist.mean + dist.std * noise.to(device, dist.mean.dtype)) * VAE_SCALING_FACTOR
    n = crops.shape[0]
    return torch.cat([latents[:n], latents[n:]], dim=1).float().cpu()


@torch.inference_mode()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """`(B, 4, 32, 32)` UNet output -> `(B, 256, 256, 3) uint8` RGB faces, still on the model's device."""
    image = vae.decode(latents.to(vae.dtype) / VAE_SCALING_FACTOR).sample
    image = (image.float() / 2 + 0.5).clamp(0, 1)
    return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
