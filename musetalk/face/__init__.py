"""Face detection, landmarks, MuseTalk face boxes and masks."""

from musetalk.face.box import (
    bbox_shift_range,
    crop_box,
    face_box,
    mask_line_y,
    nearest_good,
)
from musetalk.face.landmarks import (
    FACE_OVAL,
    MESH_TO_IBUG68,
    FaceDetection,
    FaceLandmarker,
    mesh_to_68,
)

__all__ = [
    "FACE_OVAL",
    "MESH_TO_IBUG68",
    "FaceDetection",
    "FaceLandmarker",
    "bbox_shift_range",
    "crop_box",
    "face_box",
    "mask_line_y",
    "mesh_to_68",
    "nearest_good",
]
