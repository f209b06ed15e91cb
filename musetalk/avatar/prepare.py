"""Avatar preparation: a video of a person -> everything generation needs, written atomically.

Steps (each reports progress and can be cancelled between frames):
  1. decode the video at 25 fps (variable frame rate resampled; native size up to `max_side`)
  2. find the face in every frame (BlazeFace) and its 68 landmarks: DWPose over the whole
     frame, as the official preprocessing, when its weights are present; otherwise the
     offline face mesh (largest face when there are several)
  3. face boxes with bbox_shift / extra_margin; frames without a face reuse the nearest box
  4. 256x256 crops -> 8-channel VAE latents (masked + reference)
  5. blend masks on the whole blending square (v1.5 jaw parsing, or the landmark polygon
     without parsing weights), stored for the part inside the frame
  6. write the avatar folder atomically
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from loguru import logger

from musetalk.avatar.store import AvatarManifest, AvatarStore, now_iso, validate_name
from musetalk.config import VIDEO_FPS, PrepareSettings
from musetalk.errors import AvatarError, MissingWeightsError, NoFaceError, PreparationCancelled
from musetalk.face.box import bbox_shift_range, crop_box, face_box, nearest_good
from musetalk.face.dwpose import DWPose
from musetalk.face.landmarks import FaceLandmarker
from musetalk.face.mask import MaskSettings, frame_blend_masks
from musetalk.latents import FACE_SIZE, encode_crops
from musetalk.media import VideoInfo, read_video
from musetalk.models import Models

ProgressCallback = Callable[[float, str], None]
_ENCODE_BATCH = 8
_LATENT_SEED = 0


SOURCE_DWPOSE = "dwpose"
SOURCE_OFFLINE = "offline"
SOURCE_LABELS = {
    SOURCE_DWPOSE: "DWPose (official MuseTalk landmarks: whole-frame top-down, flip test)",
    SOURCE_OFFLINE: "offline face mesh (BlazeFace + 468-point mesh mapped to 68 points; no DWPose weights)",
}


@dataclass
class FaceTrack:
    """Per-frame face analysis of a clip (also what the panel's preview shows)."""

    landmarks: list[np.ndarray | None]  # (68, 2) float32 per frame, None where no face
    missing: list[int]  # frames without a face
    multi_face: list[int]  # frames with more than one face (the largest is used)
    source: str = SOURCE_OFFLINE  # which landmark model gave the points (SOURCE_LABELS)

    def shift_range(self) -> tuple[int, int]:
        return bbox_shift_range(self.landmarks)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise PreparationCancelled("Preparation cancelled; no avatar was written.")


@lru_cache(maxsize=2)
def _load_dwpose(path: str, mtime_ns: int, size: int, device: str) -> DWPose:
    """One onnxruntime session per file version and device (the key changes when the file does)."""
    return DWPose.from_file(path, device=device)


def landmark_model(models: Models, choice: str = "auto") -> DWPose | None:
    """The DWPose model for `choice` ("auto" | "dwpose" | "offline"), or None for the offline mesh.

    auto: DWPose when ``models/dwpose/dw-ll_ucoco_384.onnx`` exists, else the offline models.
    A file that exists but cannot be used raises `MissingWeightsError` naming it; preparing
    with ``landmarks="offline"`` then still works.
    """
    if choice == SOURCE_OFFLINE:
        return None
    path = models.paths.dwpose if models.paths is not None else None
    if path is None or not path.is_file():
        if choice == SOURCE_DWPOSE:
            where = path or "models/dwpose/dw-ll_ucoco_384.onnx"
            root = str(models.paths.models_dir) if models.paths is not None else "models"
            raise MissingWeightsError([f"{where} is missing (DWPose landmarks, asked for with landmarks=dwpose)"], root)
        logger.info("No DWPose weights at {}: using the offline face-mesh landmarks", path)
        return None
    stat = path.stat()
    try:
        return _load_dwpose(str(path), stat.st_mtime_ns, stat.st_size, models.device.type)
    except MissingWeightsError as exc:
        hint = "or prepare with the offline landmarks instead (--landmarks offline)"
        raise MissingWeightsError([*exc.problems, hint], exc.models_dir, exc.fetch_command) from None


def track_faces(
    landmarker: FaceLandmarker,
    frames: list[np.ndarray],
    *,
    dwpose: DWPose | None = None,
    progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> FaceTrack:
    """Landmarks of the face in every frame.

    BlazeFace (confirmed by the face mesh) decides whether a frame has a face. The 68 points
    come from `dwpose` run over the whole frame when given (as the official preprocessing
    does, so with several people it follows the person DWPose finds), otherwise from the
    face mesh of the largest face.
    """
    landmarks: list[np.ndarray | None] = []
    missing: list[int] = []
    multi: list[int] = []
    for i, frame in enumerate(frames):
        _check_cancel(cancel)
        faces = landmarker.detect(frame)
        lm = None
        if faces:
            lm = dwpose.landmarks68(frame) if dwpose is not None else landmarker.landmarks68(frame, faces[0])
        if len(faces) > 1:
            multi.append(i)
        if lm is None:
            missing.append(i)
        landmarks.append(lm)
        if progress is not None:
            progress(i + 1)
    return FaceTrack(landmarks, missing, multi, SOURCE_DWPOSE if dwpose is not None else SOURCE_OFFLINE)


def boxes_for(
    track: FaceTrack, settings: PrepareSettings, frame_size: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """Face boxes for every frame; frames without a face take the nearest frame's box."""
    raw = [
        None if lm is None else face_box(lm, settings.bbox_shift, settings.extra_margin, frame_size)
        for lm in track.landmarks
    ]
    return nearest_good(raw)


def face_crops(frames: list[np.ndarray], boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """`(N, 256, 256, 3) uint8` Lanczos-resized face boxes, the UNet's view of each frame."""
    return np.stack(
        [
            cv2.resize(f[y0:y1, x0:x1], (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LANCZOS4)
            for f, (x0, y0, x1, y1) in zip(frames, boxes)
        ]
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
    """One blurred blend mask per frame at crop-box size (`crop_box` of each face box).

    Computed on MuseTalk's whole blending square (black outside the frame), see
    `frame_blend_masks`.
    """
    contours = None
    if mask_settings.mode == "polygon":
        contours = [jaw_contour(lm) for lm in nearest_good(track.landmarks)]
    regions, masks = frame_blend_masks(
        frames, boxes, settings=mask_settings, parser=models.face_parser, contours=contours
    )
    if [tuple(r) for r in regions] != [tuple(int(v) for v in c) for c in crop_boxes]:
        raise ValueError("crop_boxes must be crop_box(box, frame size) of each face box")
    return masks


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
    max_side: int | None = None,
) -> AvatarManifest:
    """Prepare (or re-prepare) avatar `name` from a video; returns its manifest.

    `max_side`, when given, replaces ``settings.max_side`` (videos whose long side is larger
    are scaled down to it; default 1920). Raises `NoFaceError`, `MediaError`, `ConfigError`,
    `MissingWeightsError` (unusable DWPose file) or `PreparationCancelled` with a message for
    the operator. On any failure nothing is written and an existing avatar of the same name
    is left as it was.
    """
    settings = settings or PrepareSettings()
    if max_side is not None:
        settings = replace(settings, max_side=int(max_side))
    validate_name(name)
    report = progress or (lambda fraction, message: None)

    # 1. Decode.
    report(0.0, "Reading video")
    frames, info = read_video(video_path, fps=VIDEO_FPS, max_side=settings.max_side, max_seconds=settings.max_seconds)
    n = len(frames)
    width, height = info.size
    logger.info("Preparing avatar {!r}: {} frames of {}x{} from {}", name, n, width, height, video_path)

    # 2. Landmarks.
    dwpose = landmark_model(models, settings.landmarks)
    track = track_faces(
        models.landmarker, frames, dwpose=dwpose, cancel=cancel,
        progress=lambda i: report(0.05 + 0.25 * i / n, f"Finding the face: frame {i}/{n}"),
    )  # fmt: skip
    logger.info("Landmarks: {}", SOURCE_LABELS[track.source])
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
            "landmark_source": track.source,
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

    manifest = store.write(
        manifest, frames, masks, np.asarray(boxes), np.asarray(crop_boxes), latent_tensor, on_progress=on_write
    )
    report(1.0, f"Avatar {name!r} ready: {n} frames")
    logger.info("Avatar {!r} written ({:.1f} MB)", name, manifest.disk_bytes / 1e6)
    return manifest


def reprepare_avatar(
    models: Models,
    store: AvatarStore,
    name: str,
    *,
    video_path: str | Path | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    **changes,
) -> AvatarManifest:
    """Prepare avatar `name` again with the current rules, from its source video.

    Works for avatars written by older rules (any readable format version). The stored
    settings are kept (bbox_shift, extra_margin, mask mode, cheek width, clip length) except
    those given in `changes` (PrepareSettings fields, e.g. ``max_side=1920`` or
    ``landmarks="offline"``); ``max_side`` and ``landmarks`` default to today's defaults, as
    the point of re-preparing is to get the current preprocessing. `video_path` replaces a
    source video that no longer exists.
    """
    manifest = store.manifest(name)
    source = Path(video_path) if video_path else Path(manifest.source_video) if manifest.source_video else None
    if source is None or not source.is_file():
        raise AvatarError(
            f"The source video of avatar {name!r} ({manifest.source_video or 'unknown'}) is gone: "
            "give the video again to re-prepare it."
        )
    stored = manifest.preparation
    kept = {
        key: stored[key]
        for key in ("bbox_shift", "extra_margin", "parsing_mode", "cheek_width", "max_seconds")
        if key in stored
    }
    settings = replace(PrepareSettings(**kept), **changes)
    return prepare_avatar(models, store, source, name, settings, progress=progress, cancel=cancel)


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
