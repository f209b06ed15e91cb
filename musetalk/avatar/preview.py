"""Preview of a video before preparing it: what the operator needs to tune `bbox_shift`.

For a few frames spread across the clip it shows the face box, the crop box, the mask
line (where the generated lower face starts, moved by `bbox_shift`), the blend mask and
one frame generated through the real UNet + VAE path, plus the adjustable bbox_shift
range measured on the clip's landmarks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from musetalk.audio import AudioFeatureEncoder, positional_encoding
from musetalk.avatar.prepare import (
    SOURCE_LABELS,
    FaceTrack,
    _face_notes,
    boxes_for,
    compute_masks,
    effective_mask_settings,
    face_crops,
    landmark_model,
    track_faces,
)
from musetalk.config import PrepareSettings
from musetalk.face.box import crop_box, mask_line_y
from musetalk.generate import blend_face
from musetalk.latents import decode_latents, encode_crops
from musetalk.media import VideoInfo, read_video
from musetalk.models import Models

_RANGE_SAMPLES = 40  # frames whose landmarks give the bbox_shift range

BOX_COLOUR = (0, 220, 0)
CROP_COLOUR = (60, 120, 255)
LINE_COLOUR = (255, 40, 40)
MASK_TINT = np.array([255, 0, 200], dtype=np.float32)


@dataclass(frozen=True)
class PreviewFrame:
    index: int  # frame number in the 25 fps clip
    annotated: np.ndarray  # (H, W, 3) uint8: boxes, mask line and mask overlay drawn on the frame
    generated: np.ndarray  # (H, W, 3) uint8: the frame with a generated (silent) mouth blended in
    box: tuple[int, int, int, int]
    mask_line: int

    def side_by_side(self) -> np.ndarray:
        return np.concatenate([self.annotated, self.generated], axis=1)


@dataclass(frozen=True)
class Preview:
    frames: list[PreviewFrame]
    shift_range: tuple[int, int]
    mask_mode: str
    notes: list[str]
    info: VideoInfo
    landmark_source: str = "offline"  # key of SOURCE_LABELS: which model gave the landmarks


def spread(n: int, count: int) -> list[int]:
    """`count` frame numbers evenly spread over `n` frames (fewer if the clip is shorter)."""
    if n <= count:
        return list(range(n))
    return [round(i * (n - 1) / (count - 1)) for i in range(count)]


@dataclass(frozen=True)
class _Analysis:
    """Decoded sample frames and their landmarks: what does not depend on the sliders."""

    key: tuple
    frames: dict[int, np.ndarray]  # frame number -> (H, W, 3) uint8
    sample: list[int]
    track: FaceTrack
    total: int
    info: VideoInfo


class PreviewCache:
    """The decoded frames and landmarks of the last clip previewed, so moving a slider re-renders
    without decoding again. One per owner (the panel's engine); safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: _Analysis | None = None

    @property
    def last(self) -> _Analysis | None:
        with self._lock:
            return self._last

    def get(self, key: tuple) -> _Analysis | None:
        with self._lock:
            return self._last if self._last is not None and self._last.key == key else None

    def put(self, analysis: _Analysis) -> None:
        with self._lock:
            self._last = analysis


def _analyse(
    models: Models, video_path, settings: PrepareSettings, count: int, cache: PreviewCache | None
) -> _Analysis:
    path = Path(video_path)
    stat = path.stat() if path.is_file() else None
    key = (
        str(path.resolve()), stat and stat.st_mtime_ns, stat and stat.st_size,
        settings.max_side, settings.max_seconds, settings.landmarks, count, id(models),
    )  # fmt: skip
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        return cached
    frames, info = read_video(video_path, max_side=settings.max_side, max_seconds=settings.max_seconds)
    sample = sorted(set(spread(len(frames), _RANGE_SAMPLES)) | set(spread(len(frames), count)))
    track = track_faces(
        models.landmarker, [frames[i] for i in sample], dwpose=landmark_model(models, settings.landmarks)
    )
    _face_notes(track, len(sample))  # raises NoFaceError when no sampled frame has a face
    analysis = _Analysis(key, {i: frames[i] for i in sample}, sample, track, len(frames), info)
    if cache is not None:
        cache.put(analysis)
    return analysis


@torch.inference_mode()
def preview_video(
    models: Models,
    video_path,
    settings: PrepareSettings | None = None,
    *,
    count: int = 4,
    cache: PreviewCache | None = None,
) -> Preview:
    """Analyse a clip and render `count` preview frames; nothing is written to disk.

    With a `cache`, the decoded frames and landmarks of the last clip are kept there, so
    changing bbox_shift, extra_margin or the mask settings re-renders without decoding again.
    """
    settings = settings or PrepareSettings()
    analysis = _analyse(models, video_path, settings, count, cache)
    info, sample, track = analysis.info, analysis.sample, analysis.track
    size = info.size
    notes = _face_notes(track, len(sample))
    shown = [sample.index(i) for i in spread(analysis.total, count)]
    chosen = [analysis.frames[sample[k]] for k in shown]
    sub = FaceTrack([track.landmarks[k] for k in shown], [], [])
    if any(lm is None for lm in sub.landmarks):
        # preview frames without a face borrow the nearest analysed frame's landmarks
        from musetalk.face.box import nearest_good

        filled = nearest_good(track.landmarks)
        sub = FaceTrack([filled[k] for k in shown], [], [])
    boxes = boxes_for(sub, settings, size)
    crops = [crop_box(b, size) for b in boxes]
    mask_settings = effective_mask_settings(models, settings)
    masks = compute_masks(models, chosen, boxes, crops, sub, mask_settings)
    generated = _generate_silent(models, chosen, boxes, crops, masks)
    out = []
    for k, i in enumerate(shown):
        out.append(
            PreviewFrame(
                index=sample[i],
                annotated=annotate(chosen[k], boxes[k], crops[k], masks[k]),
                generated=generated[k],
                box=boxes[k],
                mask_line=mask_line_y(boxes[k]),
            )
        )
    notes = [f"Landmarks: {SOURCE_LABELS[track.source]}", *notes]
    return Preview(out, track.shift_range(), mask_settings.mode, notes, info, track.source)


def _generate_silent(models: Models, frames, boxes, crops, masks) -> list[np.ndarray]:
    """One real UNet + VAE pass per frame with the features of silence (mouth at rest)."""
    encoder = AudioFeatureEncoder(models.whisper, models.feature_extractor, models.device, models.dtype)
    silence = encoder.frame_features(np.zeros(16000, dtype=np.float32))[12:13]
    latents = encode_crops(models.vae, face_crops(frames, boxes), generator=torch.Generator().manual_seed(0))
    audio = (silence + positional_encoding(50, models.audio_dim)).to(models.device, models.dtype)
    audio = audio.expand(len(frames), -1, -1)
    pred = models.unet(
        latents.to(models.device, models.dtype),
        torch.zeros(1, dtype=torch.long, device=models.device),
        encoder_hidden_states=audio,
    ).sample
    faces = decode_latents(models.vae, pred).cpu().numpy()
    return [blend_face(f, face, b, c, m) for f, face, b, c, m in zip(frames, faces, boxes, crops, masks)]


def annotate(frame: np.ndarray, box, crop, mask: np.ndarray) -> np.ndarray:
    """Draw the blend mask (tinted), the crop box, the face box and the mask line on a copy."""
    out = frame.copy()
    cx0, cy0, cx1, cy1 = crop
    alpha = (mask.astype(np.float32) / 255.0 * 0.45)[..., None]
    region = out[cy0:cy1, cx0:cx1].astype(np.float32)
    out[cy0:cy1, cx0:cx1] = (region * (1 - alpha) + MASK_TINT * alpha).astype(np.uint8)
    thickness = max(1, round(max(frame.shape[:2]) / 400))
    x0, y0, x1, y1 = box
    cv2.rectangle(out, (cx0, cy0), (cx1 - 1, cy1 - 1), CROP_COLOUR, thickness)
    cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), BOX_COLOUR, thickness)
    line = mask_line_y(box)
    cv2.line(out, (x0, line), (x1 - 1, line), LINE_COLOUR, thickness)
    return out
