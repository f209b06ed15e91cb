"""MuseTalk v1.5 face-box arithmetic on 68-point (iBUG) landmarks, pure numpy.

The box decides what the UNet sees: its crop is resized to 256x256 and the lower half is
inpainted, so the box's centre line is where the generated mouth region starts. MuseTalk
places that line on the nose-bridge landmark 29, moved by the user's ``bbox_shift``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from musetalk.errors import ConfigError, NoFaceError

T = TypeVar("T")

Box = tuple[int, int, int, int]


def face_box(lm68: np.ndarray, bbox_shift: int, extra_margin: int, frame_size: tuple[int, int]) -> Box:
    """MuseTalk's face box (x0, y0, x1, y1) in integer frame pixels.

    ``lm68`` is (68, 2) frame pixels; ``frame_size`` is (width, height). Coordinates are
    cast to integers first as the official code does (int32: truncation toward zero, so
    129.9 -> 129), then: ``c = lm[29].y + bbox_shift`` (positive = down), ``half = max(y) - c``,
    ``top = max(0, c - half)``, box = (min x, top, max x, max y), and ``extra_margin`` is added
    to the bottom. Everything is clamped to the frame.

    Where the inpainting starts: before the margin the box's centre line is exactly
    ``int(lm[29].y) + bbox_shift``, so ``bbox_shift`` moves it by exactly that many pixels.
    The margin then lowers the centre line (`mask_line_y`) by ``extra_margin / 2``, and clamping
    at the top or bottom of the frame moves it too.
    """
    lm = integer_landmarks(lm68)
    width, height = frame_size
    centre = int(lm[29, 1]) + int(bbox_shift)
    chin = int(lm[:, 1].max())
    if centre >= chin:
        raise ConfigError(
            f"bbox_shift {bbox_shift} moves the mask line to or below the chin; "
            "use a value inside the range shown for this avatar (see bbox_shift_range)."
        )
    top = max(0, 2 * centre - chin)  # centre - (chin - centre)
    x0 = int(lm[:, 0].min())
    x1 = int(lm[:, 0].max())
    bottom = chin + int(extra_margin)
    x0, x1 = _clamp(x0, width), _clamp(x1, width)
    top, bottom = _clamp(top, height), _clamp(bottom, height)
    if x1 - x0 < 2 or bottom - top < 2:
        raise NoFaceError(
            f"The face lies outside the {width}x{height} frame (box {x0},{top},{x1},{bottom}); "
            "use a video where the whole face is inside the picture."
        )
    return x0, top, x1, bottom


def integer_landmarks(lm68: np.ndarray) -> np.ndarray:
    """(68, 2) float landmarks -> (68, 2) int64, truncated toward zero like numpy's int32 cast."""
    lm = np.asarray(lm68)
    if lm.shape != (68, 2):
        raise ValueError(f"expected (68, 2) landmarks, got shape {lm.shape}")
    return lm.astype(np.float64).astype(np.int32).astype(np.int64)


def mask_line_y(box: Sequence[int]) -> int:
    """Frame row where MuseTalk's inpainted lower half starts: the box's centre line.

    The 256x256 crop of ``box`` is masked from row 128 down, which is ``y0 + (y1 - y0) / 2``
    in the frame (floored to a whole row).
    """
    _, y0, _, y1 = box
    return (int(y0) + int(y1)) // 2


def bbox_shift_range(landmarks: Sequence[np.ndarray | None]) -> tuple[int, int]:
    """The bbox_shift range to offer users: (-mean(lm30.y - lm29.y), +mean(lm29.y - lm28.y)).

    Within it the mask line stays between landmarks 28 and 30 (upper nose bridge to nose tip).
    Frames without landmarks (None) are ignored. As the official code: landmarks truncated to
    integers, per-frame differences averaged, each mean truncated toward zero.
    """
    found = [integer_landmarks(lm) for lm in landmarks if lm is not None]
    if not found:
        raise NoFaceError("No face landmarks to compute the bbox_shift range from: no frame has a face.")
    stack = np.stack(found)  # (N, 68, 2)
    down = float(np.mean(stack[:, 30, 1] - stack[:, 29, 1]))
    up = float(np.mean(stack[:, 29, 1] - stack[:, 28, 1]))
    return -int(down), int(up)


def crop_half_size(width: int, height: int, expand: float = 1.5) -> int:
    """Half side of the blending square: ``int(max(w, h) // 2 * expand)`` (integer halving first)."""
    return int(max(int(width), int(height)) // 2 * expand)


def square_crop_box(box: Sequence[int]) -> Box:
    """MuseTalk's blending square around a face box, in frame pixels; it may reach past the frame.

    Centre ``((x0 + x1) // 2, (y0 + y1) // 2)``, half side `crop_half_size`. The blend mask is
    computed on this whole square (black outside the frame), as the official code does.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    half = crop_half_size(x1 - x0, y1 - y0)
    return cx - half, cy - half, cx + half, cy + half


def crop_box(box: Sequence[int], frame_size: tuple[int, int]) -> Box:
    """The part of `square_crop_box` inside the frame: the region the blend may change.

    Pasting the square through its mask changes only in-frame pixels, so storing this
    region and the matching part of the square's mask gives the same frames. The face box
    is always inside it, since it is inside the frame.
    """
    width, height = frame_size
    sx0, sy0, sx1, sy1 = square_crop_box(box)
    return _clamp(sx0, width), _clamp(sy0, height), _clamp(sx1, width), _clamp(sy1, height)


def cut_square(frame: np.ndarray, square: Sequence[int]) -> np.ndarray:
    """(H, W, C) frame -> the `square` region as an image, black where it lies outside the frame.

    The same pixels as PIL's ``Image.crop`` of a box reaching past the image.
    """
    x0, y0, x1, y1 = (int(v) for v in square)
    h, w = frame.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0) + frame.shape[2:], dtype=frame.dtype)
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if fx0 < fx1 and fy0 < fy1:
        out[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0] = frame[fy0:fy1, fx0:fx1]
    return out


def nearest_good(boxes: list[T | None]) -> list[T]:
    """Fill frames without a face (None) from the nearest frame that has one.

    MuseTalk drops such frames, which desynchronises audio and video; copying the nearest
    face keeps one entry per frame. Ties go to the earlier frame.
    """
    n = len(boxes)
    if n == 0:
        raise NoFaceError("The video has no frames to look for a face in.")
    if all(b is None for b in boxes):
        shown = ", ".join(str(i) for i in range(min(n, 5))) + (", ..." if n > 5 else "")
        raise NoFaceError(
            f"No face was found in any of the {n} frames (frames {shown}). "
            "Use a video in which one face is clearly visible, frontal and not too small."
        )
    prev_idx: list[int | None] = [None] * n
    last: int | None = None
    for i, b in enumerate(boxes):
        if b is not None:
            last = i
        prev_idx[i] = last
    out: list[T] = []
    nxt: int | None = None
    next_idx: list[int | None] = [None] * n
    for i in range(n - 1, -1, -1):
        if boxes[i] is not None:
            nxt = i
        next_idx[i] = nxt
    for i in range(n):
        p, q = prev_idx[i], next_idx[i]
        if q is None or (p is not None and i - p <= q - i):
            src = p
        else:
            src = q
        out.append(boxes[src])  # type: ignore[arg-type]
    return out


def _clamp(v: int, limit: int) -> int:
    return int(min(max(v, 0), limit))
