"""Avatar preparation: a video of a person -> everything generation needs, written atomically.

Steps (each reports progress and can be cancelled between frames):
  1. decode the video at 25 fps (variable frame rate resampled, large frames scaled down)
  2. find the face and its 68 landmarks in every frame (largest face when there are several)
  3. face boxes with bbox_shift / extra_margin; frames without a face reuse the nearest box
  4. 256x256 crops -> 8-channel VAE latents (masked + reference)
  5. blend masks at crop size (v1.5 jaw parsing, or the landmark polygon without weights)
  6. write the avatar folder atomically
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from loguru import logger

from musetalk.avatar.store import AvatarManifest, AvatarStore, now_iso, validate_name
from musetalk.config import VIDEO_FPS, PrepareSettings
from musetalk.errors import MuseTalkError, NoFaceError
from musetalk.face.box import bbox_shift_range, crop_box, face_box, nearest_good
from musetalk.face.landmarks import FaceLandmarker
from musetalk.face.mask import MaskSettings, blend_masks_batch
from musetalk.latents import FACE_SIZE, encode_crops
from musetalk.media import VideoInfo, read_video
from musetalk.models import Models

ProgressCallback = Callable[[float, str], None]
_ENCODE_BATCH = 8
_LATENT_SEED = 0


class PreparationCancelled(MuseTalkError):
    """The operator cancelled; nothing was written."""


@dataclass
class FaceTrack:
    """Per-frame face analysis of a clip (also what the panel's preview shows)."""

    landmarks: list[np.ndarray | None]  # (68, 2) float32 per frame, None where no face
    missing: list[int]  # frames without a face
    multi_face: list[int]  # frames with more than one face (the largest is used)

    def shift_range(self) -> tuple[int, int]:
        return bbox_shift_range(self.landmarks)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise PreparationCancelled("Preparation cancelled; no avatar was written.")


def track_faces(
    landmarker: FaceLandmarker,
    frames: list[np.ndarray],
    *,
    progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> FaceTrack:
    """Landmarks of the largest face in every frame."""
    landmarks: list[np.ndarray | None] = []
    missing: list[int] = []
    multi: list[int] = []
    for i, frame in enumerate(frames):
        _check_cancel(cancel)
        faces = landmarker.detect(frame)
        lm = landmarker.landmarks68(frame, faces[0]) if faces else None
        if len(faces) > 1:
            multi.append(i)
        if lm is None:
            missing.append(i)
        landmarks.append(lm)
        if progress is not None:
            progress(i + 1)
    return FaceTrack(landmarks, missing, multi)


def boxes_for(track: FaceTrack, settings: PrepareSettings, frame_size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Face boxes for every frame; frames without a face take the nearest frame's box."""
    raw = [
        None if lm is None else face_box(lm, settings.bbox_shift, settings.extra_margin, frame_size)
        for lm in track.landmarks
    ]
    return nearest_good(raw)


def face_crops(frames: list[np.ndarray], boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """`(N, 256, 256, 3) uint8` Lanczos-resized face boxes, the UNet's view of each frame."""
    return np.stack(
        [cv2.resize(f[y0:y1, x0:x1], (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LANCZOS4) for f, (x0, y0, x1, y1) in zip(frames, boxes)]
    )


def jaw_contour(lm68: np.ndarray) -> np.ndarray:
    """Face outline from 68 landmarks (jaw 0-16, then brows 26..17): the polygon-mask shape."""
    return np.concatenate([lm68[0:17], lm68[26:16:-1]]).astype(np.float32)


def compute_masks(
    models: Models,
    frames: list[np.ndarray],
    boxes: list[tuple[int, int, int, int]],
    crop_boxes: list[tuple[int, int, int, int]],
    track: FaceTrack,
    mask_settings: MaskSettings,
) -> list[np.ndarray]:
    """One blurred blend mask per frame at crop-box size."""
    crops = [f[cy0:cy1, cx0:cx1] for f, (cx0, cy0, cx1, cy1) in zip(frames, crop_boxes)]
    in_crop = [(x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0) for (x0, y0, x1, y1), (cx0, cy0, _, _) in zip(boxes, crop_boxes)]
    contours = None
    if mask_settings.mode == "polygon":
        filled = nearest_good(track.landmarks)
        contours = [jaw_contour(lm) - np.array([cb[0], cb[1]], dtype=np.float32) for lm, cb in zip(filled, crop_boxes)]
    return blend_masks_batch(
        crops, in_crop, settings=mask_settings, parser=models.face_parser, contours_in_crop=contours
    )


def effective_mask_settings(models: Models, settings: PrepareSettings) -> MaskSettings:
    """The requested parsing mode, or the landmark polygon when face-parsing weights are absent."""
    mode = settings.parsing_mode
    if mode != "polygon" and models.face_parser is None:
        logger.warning("No face-parsing weights: using the landmark-polygon mask instead of {!r}", mode)
        mode = "polygon"
    return MaskSettings(mode=mode, cheek_width=settings.cheek_width)


def prepare_avatar(
    models: Models,
    store: AvatarStore,
    video_path: str | Path,
    name: str,
    settings: PrepareSettings | None = None,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> AvatarManifest:
    """Prepare (or re-prepare) avatar `name` from a video; returns its manifest.

    Raises `NoFaceError`, `MediaError`, `ConfigError` or `PreparationCancelled` with a
    message for the operator. On any failure nothing is written and an existing avatar
    of the same name is left as it was.
    """
    settings = settings or PrepareSettings()
    validate_name(name)
    report = progress or (lambda fraction, message: None)

    # 1. Decode.
    report(0.0, "Reading video")
    frames, info = read_video(video_path, fps=VIDEO_FPS, max_side=settings.max_side, max_seconds=settings.max_seconds)
    n = len(frames)
    width, height = info.size
    logger.info("Preparing avatar {!r}: {} frames of {}x{} from {}", name, n, width, height, video_path)

    # 2. Landmarks.
    track = track_faces(
        models.landmarker, frames, cancel=cancel,
        progress=lambda i: report(0.05 + 0.25 * i / n, f"Finding the face: frame {i}/{n}"),
    )  # fmt: skip
    notes = _face_notes(track, n)
    for note in notes:
        logger.warning("{}: {}", name, note)

    # 3. Boxes.
    boxes = boxes_for(track, settings, (width, height))
    crop_boxes = [crop_box(b, (width, height)) for b in boxes]

    # 4. Latents.
    generator = torch.Generator(device="cpu").manual_seed(_LATENT_SEED)
    latents = []
    for start in range(0, n, _ENCODE_BATCH):
        _check_cancel(cancel)
        crops = face_crops(frames[start : start + _ENCODE_BATCH], boxes[start : start + _ENCODE_BATCH])
        latents.append(encode_crops(models.vae, crops, generator=generator))
        done = min(start + _ENCODE_BATCH, n)
        report(0.30 + 0.45 * done / n, f"Encoding faces: frame {done}/{n}")
    latent_tensor = torch.cat(latents)

    # 5. Masks.
    _check_cancel(cancel)
    mask_settings = effective_mask_settings(models, settings)
    report(0.75, f"Blend masks ({mask_settings.mode})")
    masks = compute_masks(models, frames, boxes, crop_boxes, track, mask_settings)

    # 6. Write atomically.
    _check_cancel(cancel)
    manifest = AvatarManifest(
        name=name,
        fps=VIDEO_FPS,
        frame_count=n,
        frame_size=(width, height),
        source_video=str(video_path),
        preparation={
            **settings.to_dict(),
            "mask_mode_used": mask_settings.mode,
            "bbox_shift_range": list(track.shift_range()),
            "frames_without_face": track.missing,
            "frames_with_several_faces": len(track.multi_face),
            "source": _source_dict(info),
            "models": models.describe(),
        },
        created=now_iso(),
        notes=notes,
    )

    def on_write(i: int, total: int) -> None:
        _check_cancel(cancel)
        report(0.9 + 0.1 * i / total, f"Writing avatar: frame {i}/{total}")

    manifest = store.write(manifest, frames, masks, np.asarray(boxes), np.asarray(crop_boxes), latent_tensor, on_progress=on_write)
    report(1.0, f"Avatar {name!r} ready: {n} frames")
    logger.info("Avatar {!r} written ({:.1f} MB)", name, manifest.disk_bytes / 1e6)
    return manifest


def _face_notes(track: FaceTrack, n: int) -> list[str]:
    notes = []
    if track.multi_face:
        notes.append(f"Several faces in {len(track.multi_face)} of {n} frames: the largest face is used.")
    if track.missing:
        if len(track.missing) == n:
            raise NoFaceError(f"No face found in any of the {n} frames. Use a video with one clearly visible face.")
        shown = ", ".join(map(str, track.missing[:10])) + (" ..." if len(track.missing) > 10 else "")
        notes.append(f"No face in {len(track.missing)} of {n} frames ({shown}): the nearest frame's face box is used.")
    return notes


def _source_dict(info: VideoInfo) -> dict:
    return {
        "fps": info.source_fps,
        "size": list(info.source_size),
        "duration": info.duration,
    }
