"""MuseTalk v1.5 blend masks: where the generated lower face replaces the original crop.

Computed once per avatar frame at preparation. The steps follow the official blending: the
blending square is cut from the frame (black outside it), a face mask is made on it (BiSeNet
parsing resized back bicubically, or a landmark polygon when the parsing weights are absent),
kept only inside the face box and only from the inpainting line down, then blurred with a
Gaussian whose kernel is about a tenth of the square's width; the in-frame part is stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np
from PIL import Image

from musetalk.errors import ConfigError
from musetalk.face.box import crop_box, cut_square, square_crop_box
from musetalk.face.parsing import (
    LOWER_LIP,
    MOUTH,
    NOSE,
    PARSE_SIZE,
    SKIN,
    UPPER_LIP,
    FaceParser,
)

MASK_MODES = ("jaw", "raw", "polygon")
PARSER_MODES = ("jaw", "raw")
_MOUTH_CLASSES = (MOUTH, UPPER_LIP, LOWER_LIP)
_PARSE_CHUNK = 16  # crops resized to 512x512 and parsed together; bounds preparation memory

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class MaskSettings:
    """How the blend mask is built; stored with an avatar so it can be rebuilt identically."""

    mode: str = "jaw"  # "jaw" (v1.5 default), "raw" (v1 style), "polygon" (no weights needed)
    cheek_width: int = 90  # jaw mode: half width of the centre column band, 512-px parsing space
    upper_boundary_ratio: float = 0.5  # fraction of the face box above the inpainting line

    def __post_init__(self) -> None:
        if self.mode not in MASK_MODES:
            raise ConfigError(f"mask mode must be one of {', '.join(MASK_MODES)}, got {self.mode!r}")
        if not 0 <= self.cheek_width <= PARSE_SIZE // 2:
            raise ConfigError(f"cheek_width must be within 0..{PARSE_SIZE // 2}, got {self.cheek_width}")
        if not 0.0 <= self.upper_boundary_ratio <= 1.0:
            raise ConfigError(f"upper_boundary_ratio must be within 0..1, got {self.upper_boundary_ratio}")


# Jaw-mode structuring elements of MuseTalk v1.5, in 512-px parsing space.
# - Dilation: a 33x33 "cone" anchored at its centre (16, 16). Rows 0-9 are empty; row r in
#   10..20 holds a centred run of width 2(r - 10) + 1; rows 21..32 a centred run of width 21.
#   OpenCV sets pixel p when skin lies at p + (offset - anchor) for a kernel offset, so skin
#   grows 16 px up (as a 21-px-wide band) and 6 px down (narrowing to a point): the pasted
#   chin covers a jaw that opens lower than the original one.
# - Erosion: a flat 35x3 ellipse applied twice pulls the mask ~34 px in from the face sides
#   (only ~2 px vertically) in the cheek bands, so the face outline, hair and background at
#   the cheeks stay original and the blur seam lands on smooth skin.
CONE_HEIGHT = 21
CONE_TAIL = 12


@cache
def _jaw_dilation_kernel() -> np.ndarray:
    size = CONE_HEIGHT + CONE_TAIL  # 33
    centre = size // 2  # 16
    kernel = np.zeros((size, size), np.uint8)
    first = CONE_HEIGHT // 2  # 10: the first non-empty row
    for row in range(first, size):
        half = min(row - first, CONE_HEIGHT // 2)  # run of width 2 * half + 1, at most 21
        kernel[row, centre - half : centre + half + 1] = 1
    return kernel


@cache
def _cheek_erosion_kernel() -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))


_CHEEK_ERODE_ITERATIONS = 2


def parsing_to_face_mask(labels512: np.ndarray, mode: str, cheek_width: int) -> np.ndarray:
    """(512,512) class ids -> (512,512) uint8 0/255 face mask for `mode` "jaw" or "raw".

    raw: skin, mouth and both lips (the v1 mask; the nose stays original).
    jaw: skin dilated (see the kernels above); in the cheek bands, columns farther than
    `cheek_width` from the centre, the dilated skin is eroded instead; nose pixels removed;
    mouth and lips added.
    """
    labels = np.asarray(labels512)
    if labels.shape != (PARSE_SIZE, PARSE_SIZE):
        raise ValueError(f"expected a ({PARSE_SIZE},{PARSE_SIZE}) label map, got {labels.shape}")
    mouth = np.isin(labels, _MOUTH_CLASSES)
    if mode == "raw":
        face = (labels == SKIN) | mouth
    elif mode == "jaw":
        skin = (labels == SKIN).astype(np.uint8) * 255
        dilated = cv2.dilate(skin, _jaw_dilation_kernel())
        eroded = cv2.erode(dilated, _cheek_erosion_kernel(), iterations=_CHEEK_ERODE_ITERATIONS)
        cols = np.arange(PARSE_SIZE)
        cheek = np.abs(cols - PARSE_SIZE // 2) >= cheek_width  # (512,) column band
        region = np.where(cheek[None, :], eroded, dilated) > 0
        face = (region & (labels != NOSE)) | mouth
    else:
        raise ValueError(f"parsing_to_face_mask handles modes {PARSER_MODES}, got {mode!r}")
    return face.astype(np.uint8) * 255


def polygon_face_mask(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K,2) ordered x,y contour -> (h,w) uint8 0/255 filled polygon; `size` = (h, w)."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3:
        raise ValueError(f"expected (K>=3, 2) contour points, got shape {pts.shape}")
    h, w = size
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32).reshape(-1, 1, 2)], 255)
    return mask


def blur_kernel_size(crop_width: int) -> int:
    """Odd Gaussian kernel ~0.1 x crop width, as the official `int(0.1*w//2*2)+1`."""
    return int(0.1 * crop_width // 2 * 2) + 1


def inpainting_line(crop_height: int, upper_boundary_ratio: float) -> int:
    """First crop row of the talking area: ``int(crop_height * ratio)``, as the official.

    On MuseTalk's square crop (centred on the face box) and ratio 0.5 this is the face box's
    centre line, where the UNet's masked lower half starts.
    """
    return int(int(crop_height) * upper_boundary_ratio)


def restrict_to_talking_area(
    face_mask: np.ndarray, face_box_in_crop: Box, upper_boundary_ratio: float = 0.5
) -> np.ndarray:
    """(h,w) uint8 -> copy that is zero outside the face box and above the inpainting line."""
    h, w = face_mask.shape
    x0, y0, x1, y1 = (int(v) for v in face_box_in_crop)
    top = max(inpainting_line(h, upper_boundary_ratio), y0, 0)
    out = np.zeros_like(face_mask)
    xa, xb = max(x0, 0), min(x1, w)
    yb = min(y1, h)
    if xa < xb and top < yb:
        out[top:yb, xa:xb] = face_mask[top:yb, xa:xb]
    return out


def _finish(face_mask: np.ndarray, face_box_in_crop: Box, settings: MaskSettings, blur: bool) -> np.ndarray:
    mask = restrict_to_talking_area(face_mask, face_box_in_crop, settings.upper_boundary_ratio)
    if blur:
        k = blur_kernel_size(mask.shape[1])
        mask = cv2.GaussianBlur(mask, (k, k), 0)
    return mask


def _resize_back(face512: np.ndarray, width: int, height: int) -> np.ndarray:
    """(512,512) uint8 mask -> (height,width), bicubic as PIL's default resize of an 'L' image."""
    return np.asarray(Image.fromarray(face512).resize((width, height), Image.BICUBIC))


def _resize_for_parsing(crop_rgb: np.ndarray) -> np.ndarray:
    if crop_rgb.shape[:2] == (PARSE_SIZE, PARSE_SIZE):
        return crop_rgb
    return np.asarray(Image.fromarray(crop_rgb).resize((PARSE_SIZE, PARSE_SIZE), Image.BILINEAR))


def _check_crop(crop: np.ndarray) -> np.ndarray:
    arr = np.asarray(crop)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
        raise ValueError(f"expected an (h,w,3) uint8 RGB crop, got shape {arr.shape} dtype {arr.dtype}")
    return arr


def blend_masks_batch(
    crops_rgb: Sequence[np.ndarray],
    face_boxes_in_crop: Sequence[Box],
    *,
    settings: MaskSettings,
    parser: FaceParser | None = None,
    contours_in_crop: Sequence[np.ndarray] | None = None,
    blur: bool = True,
) -> list[np.ndarray]:
    """Blend masks for many crops (sizes may differ), parsing them in shared forward passes.

    Each crop should be MuseTalk's whole square (`square_crop_box`, black outside the frame):
    the parser, the inpainting line and the blur all see the square. Returns one (h_i,w_i)
    uint8 alpha mask per crop; see `blend_mask`.
    """
    crops = [_check_crop(c) for c in crops_rgb]
    if len(face_boxes_in_crop) != len(crops):
        raise ValueError(f"{len(crops)} crops but {len(face_boxes_in_crop)} face boxes")
    masks: list[np.ndarray] = []
    if settings.mode in PARSER_MODES:
        if parser is None:
            raise ConfigError(
                f"mask mode {settings.mode!r} needs the BiSeNet face parser "
                "(models/face-parse-bisent/79999_iter.pth); load it with FaceParser.from_pretrained "
                "or use mask mode 'polygon'"
            )
        for start in range(0, len(crops), _PARSE_CHUNK):
            chunk = crops[start : start + _PARSE_CHUNK]
            labels = parser.parse_512(np.stack([_resize_for_parsing(c) for c in chunk]))
            for crop, lab, box in zip(chunk, labels, face_boxes_in_crop[start : start + _PARSE_CHUNK]):
                h, w = crop.shape[:2]
                face512 = parsing_to_face_mask(lab, settings.mode, settings.cheek_width)
                face = _resize_back(face512, w, h)
                masks.append(_finish(face, box, settings, blur))
        return masks
    # polygon mode: landmarks only
    if contours_in_crop is None or len(contours_in_crop) != len(crops):
        raise ValueError("mask mode 'polygon' needs one face contour (K,2) in crop coordinates per crop")
    for crop, box, contour in zip(crops, face_boxes_in_crop, contours_in_crop):
        face = polygon_face_mask(contour, crop.shape[:2])
        masks.append(_finish(face, box, settings, blur))
    return masks


def blend_mask(
    crop_rgb: np.ndarray,
    face_box_in_crop: Box,
    *,
    settings: MaskSettings,
    parser: FaceParser | None = None,
    contour_in_crop: np.ndarray | None = None,
    blur: bool = True,
) -> np.ndarray:
    """(h,w,3) uint8 RGB crop -> (h,w) uint8 alpha mask (255 = generated face).

    `face_box_in_crop` is (x0, y0, x1, y1) in crop pixels. jaw/raw modes need `parser`;
    polygon mode needs `contour_in_crop`. `blur=False` returns the hard mask before the blur.
    """
    return blend_masks_batch(
        [crop_rgb],
        [face_box_in_crop],
        settings=settings,
        parser=parser,
        contours_in_crop=None if contour_in_crop is None else [contour_in_crop],
        blur=blur,
    )[0]


def frame_blend_masks(
    frames: Sequence[np.ndarray],
    boxes: Sequence[Box],
    *,
    settings: MaskSettings,
    parser: FaceParser | None = None,
    contours: Sequence[np.ndarray] | None = None,
) -> tuple[list[Box], list[np.ndarray]]:
    """Official v1.5 blend masks for whole frames: (crop boxes, masks cut to them).

    For each (H,W,3) frame and face box: the blending square (`square_crop_box`) is cut
    from the frame with black outside it, parsed, limited and blurred at square size; the
    part of the mask inside the frame is returned with its frame region (`crop_box`), which
    is exactly what pasting the square changes. `contours` (K,2) are in frame pixels
    (polygon mode only).
    """
    squares = [square_crop_box(b) for b in boxes]
    regions = [crop_box(b, (f.shape[1], f.shape[0])) for f, b in zip(frames, boxes)]
    crops = [cut_square(f, sq) for f, sq in zip(frames, squares)]
    in_square = [(b[0] - sq[0], b[1] - sq[1], b[2] - sq[0], b[3] - sq[1]) for b, sq in zip(boxes, squares)]
    shifted = None
    if contours is not None:
        shifted = [np.asarray(c, np.float32) - np.array(sq[:2], np.float32) for c, sq in zip(contours, squares)]
    full = blend_masks_batch(crops, in_square, settings=settings, parser=parser, contours_in_crop=shifted)
    masks = [
        np.ascontiguousarray(m[r[1] - sq[1] : r[3] - sq[1], r[0] - sq[0] : r[2] - sq[0]])
        for m, r, sq in zip(full, regions, squares)
    ]
    return regions, masks
