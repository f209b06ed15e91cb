"""Offline face detection and 68-point landmarks from the MediaPipe face models.

MuseTalk needs 68 iBUG-ordered face landmarks per frame (the official code gets them from
DWPose). We get them without any run-time download: BlazeFace short-range finds the face, the
468-point face mesh locates it precisely, and a fixed index table picks the 68 iBUG points
out of the mesh. Both ``.tflite`` files come from the mediapipe 0.10.21 wheel (Apache-2.0)
via ``python scripts/fetch_face_models.py``; they run on ``ai_edge_litert`` (mediapipe itself
is not installed, it conflicts with pipecat).

Threading: one `FaceLandmarker` holds two TFLite interpreters, which are not re-entrant. Calls
on the same instance are serialised by a lock, so sharing one instance is safe but not
parallel; give each worker thread its own instance for parallel work (construction loads
~1.5 MB of models and takes a few milliseconds).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from musetalk.errors import MediaError, MissingWeightsError

DETECTOR_FILE = "face_detection_short_range.tflite"
MESH_FILE = "face_landmark.tflite"
MODEL_FILES: tuple[str, str] = (DETECTOR_FILE, MESH_FILE)
SUBDIR = "face-landmarks"
FETCH_COMMAND = "python scripts/fetch_face_models.py"

# Face oval of the 468-point mesh, in order: forehead top (10), down the image-right side
# to the chin (152), up the image-left side. Used as a polygon for face masks.
# fmt: off
FACE_OVAL: tuple[int, ...] = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)
# fmt: on

# 68-point iBUG layout picked out of the 468-point mesh. "Right" means the subject's right
# (image left). How the table was built, group by group, from the mesh topology (the contour
# chains of the mesh's face oval, eyes, lips and nose) measured on skimage's astronaut and on
# its mirror image (both gave the same choices, and every left/right pair is a mesh mirror pair):
# - corners and midline points are unambiguous mesh vertices: eye corners 33/133 and 362/263,
#   mouth corners 61/291 (outer) and 78/308 (inner), lip midlines 0/17 (outer) and 13/14
#   (inner), chin 152, subnasale 2;
# - the points between them are the chain vertices nearest to the arc-length fractions the
#   iBUG mean shape has on the same contour: the jaw runs in 8 equal steps from the face-oval
#   vertex at the outer-eye-corner height (127/356) to the chin; 28 and 29 split the bridge
#   168 -> 4 in thirds; 49/50 sit at ~0.37/0.75 of the upper lip from corner to midline,
#   55/56 at ~0.39/0.72 of the lower lip, 61/63/65/67 at ~0.7 of the inner lips; the lid
#   points at ~1/3 and 2/3 of each lid;
# - 30 is mesh 4 rather than the most protruding point 1: in the iBUG mean shape the tip sits
#   ~1/10 of the face height above the subnasale, which 4 matches and 1 (almost on the nostril
#   line) does not; 27 is 168, level with the outer eye corners as in the mean shape;
# - brows follow the mesh's upper brow edge (5 vertices each); nose bottom is the mesh's
#   nostril contour 98-97-2-326-327.
# MuseTalk's box uses 28, 29, 30 and the extremes of all points (jaw width, chin), which is
# why the jaw and bridge were checked most carefully.
# fmt: off
MESH_TO_IBUG68: tuple[int, ...] = (
    # 0-16 jaw: image-left face edge at eye height, down the oval to the chin (152), up again.
    127, 234, 132, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 361, 454, 356,
    # 17-21 right brow (outer -> inner), 22-26 left brow (inner -> outer).
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    # 27-30 nose bridge, top (between the eyes) -> tip.
    168, 197, 195, 4,
    # 31-35 nose bottom, right ala -> subnasale -> left ala.
    98, 97, 2, 326, 327,
    # 36-41 right eye: outer corner, upper lid x2, inner corner, lower lid x2.
    33, 160, 158, 133, 153, 144,
    # 42-47 left eye: inner corner, upper lid x2, outer corner, lower lid x2.
    362, 385, 387, 263, 373, 380,
    # 48-59 outer lips: right corner, upper lip to the left corner, lower lip back.
    61, 39, 37, 0, 267, 269, 291, 321, 314, 17, 84, 91,
    # 60-67 inner lips: right corner, upper inner lip, left corner, lower inner lip back.
    78, 82, 13, 312, 308, 317, 14, 87,
)
# fmt: on

_DET_SIZE = 128
_MESH_SIZE = 192
_ROI_SCALE = 1.5  # mesh crop side relative to the longer side of the detected box
_NMS_IOU = 0.3
_MAX_DETECT_SIDE = 1024  # frames larger than this are downscaled once before detection
_WEAK_DETECTION = 0.7  # below this BlazeFace score the mesh model must be sure of a face
_SURE_FACE_LOGIT = 8.0  # mesh face-presence logit (sigmoid 0.9997); clear faces give ~20-28


@dataclass(frozen=True)
class FaceDetection:
    """A detected face in frame pixels.

    ``keypoints`` are BlazeFace's six points (right eye, left eye, nose tip, mouth, right ear,
    left ear) as (x, y) frame pixels; they orient the mesh crop and may be left out when a
    detection is built by hand (the crop is then axis-aligned).
    """

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in frame pixels
    score: float
    keypoints: tuple[tuple[float, float], ...] | None = field(default=None, compare=False, repr=False)

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@lru_cache(maxsize=1)
def _anchors() -> np.ndarray:
    """BlazeFace short-range anchor centres, (896, 2) float32 in [0, 1] (x, y).

    Strides 8, 16, 16, 16 on a 128 input: a 16x16 grid with 2 anchors per cell, then the
    three stride-16 layers merged into one 8x8 grid with 6 anchors per cell. Anchor sizes are
    fixed to 1, so only the centres matter.
    """
    centres = []
    for grid, per_cell in ((16, 2), (8, 6)):
        ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
        cells = np.stack([(xs + 0.5) / grid, (ys + 0.5) / grid], axis=-1).reshape(-1, 2)
        centres.append(np.repeat(cells, per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box against (N, 4) boxes, all x0, y0, x1, y1."""
    ix0 = np.maximum(box[0], others[:, 0])
    iy0 = np.maximum(box[1], others[:, 1])
    ix1 = np.minimum(box[2], others[:, 2])
    iy1 = np.minimum(box[3], others[:, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def _weighted_nms(boxes: np.ndarray, kps: np.ndarray, scores: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Merge overlapping candidates by score-weighted averaging, as BlazeFace is meant to be used.

    boxes (N, 4), kps (N, 6, 2), scores (N,). Returns (box, keypoints, best score) per face.
    """
    order = np.argsort(-scores)
    boxes, kps, scores = boxes[order], kps[order], scores[order]
    alive = np.ones(len(scores), dtype=bool)
    faces = []
    for i in range(len(scores)):
        if not alive[i]:
            continue
        group = alive & (_iou(boxes[i], boxes) > _NMS_IOU)
        group[i] = True
        w = scores[group][:, None]
        box = (boxes[group] * w).sum(0) / w.sum()
        kp = (kps[group] * w[:, :, None]).sum(0) / w.sum()
        faces.append((box, kp, float(scores[i])))
        alive &= ~group
    return faces


def _models_dir(directory: Path) -> Path:
    """Accept either the face-landmarks folder itself or the models root containing it."""
    if not all((directory / name).is_file() for name in MODEL_FILES) and (directory / SUBDIR).is_dir():
        return directory / SUBDIR
    return directory


class FaceLandmarker:
    """Face detection (BlazeFace) plus 468-point mesh, exposed as boxes, mesh and iBUG-68 points."""

    def __init__(self, detector_path: str | Path, mesh_path: str | Path, num_threads: int = 1):
        """Load both models; prefer `from_pretrained`, which checks the files first."""
        from ai_edge_litert.interpreter import Interpreter

        self._lock = threading.Lock()
        self._det = Interpreter(model_path=str(detector_path), num_threads=num_threads)
        self._det.allocate_tensors()
        self._mesh = Interpreter(model_path=str(mesh_path), num_threads=num_threads)
        self._mesh.allocate_tensors()
        self._det_in = self._det.get_input_details()[0]["index"]
        det_out = {d["name"]: d["index"] for d in self._det.get_output_details()}
        self._det_boxes, self._det_scores = det_out["regressors"], det_out["classificators"]
        self._mesh_in = self._mesh.get_input_details()[0]["index"]
        mesh_out = {d["name"]: d["index"] for d in self._mesh.get_output_details()}
        self._mesh_points, self._mesh_face = mesh_out["conv2d_21"], mesh_out["conv2d_31"]

    @classmethod
    def from_pretrained(cls, directory: str | Path, num_threads: int = 1) -> FaceLandmarker:
        """Load from ``<models>/face-landmarks`` (or the models root); MissingWeightsError if absent or unusable."""
        directory = _models_dir(Path(directory))
        root = directory.parent if directory.name == SUBDIR else directory
        command = FETCH_COMMAND if root == Path("models") else f"{FETCH_COMMAND} --models-dir {root}"
        problems = [
            f"{directory / name} is missing (face model from the mediapipe 0.10.21 wheel)"
            for name in MODEL_FILES
            if not (directory / name).is_file() or (directory / name).stat().st_size == 0
        ]
        if problems:
            raise MissingWeightsError(problems, str(root), command)
        try:
            return cls(directory / DETECTOR_FILE, directory / MESH_FILE, num_threads=num_threads)
        except (ValueError, RuntimeError, KeyError, IndexError) as exc:
            raise MissingWeightsError(
                [f"{directory} holds face model files that cannot be loaded ({exc}); delete them and fetch again"],
                str(root),
                command,
            ) from exc

    # ------------------------------------------------------------------ detection

    def detect(self, rgb: np.ndarray, min_score: float = 0.5) -> list[FaceDetection]:
        """Faces in an (H, W, 3) uint8 RGB frame, largest first (boxes clipped to the frame).

        BlazeFace alone scores some animal faces and face-like textures at 0.5-0.6, so every
        candidate is confirmed by the mesh model's face-presence output before it is kept.
        """
        return [det for det, _ in self._find(_check_frame(rgb), min_score)]

    def _find(self, frame: np.ndarray, min_score: float) -> list[tuple[FaceDetection, np.ndarray]]:
        """Detect, merge and confirm faces: [(detection, (468, 2) mesh)], largest first.

        Passes over the (at most 1024 px) frame: the whole frame letterboxed into the 128x128
        input; on frames whose sides differ a lot also square windows of the short side along
        the long one (so a face in a wide or tall frame is not shrunk out of reach); and when
        still nothing is found, windows of half the short side, for small faces.
        """
        small, factor = _downscale(frame, _MAX_DETECT_SIDE)
        h, w = small.shape[:2]
        windows = [(0, 0, max(h, w))]
        if max(h, w) > 1.3 * min(h, w):
            windows += _windows(w, h, min(h, w))
        found = self._confirm(frame, self._candidates(small, windows, min_score), factor)
        if not found and min(h, w) >= 2 * _DET_SIZE:
            found = self._confirm(frame, self._candidates(small, _windows(w, h, min(h, w) // 2), min_score), factor)
        found.sort(key=lambda item: item[0].area, reverse=True)
        return found

    def _candidates(
        self, img: np.ndarray, windows: list[tuple[int, int, int]], min_score: float
    ) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Raw BlazeFace candidates from every window, merged by weighted NMS."""
        h, w = img.shape[:2]
        cands = []
        with self._lock:
            for x0, y0, side in windows:
                for box, kp, score in self._detect_window(img[y0 : y0 + side, x0 : x0 + side], x0, y0, side, min_score):
                    # A face cut by a window edge inside the frame gives a partial box; the
                    # overlapping window (or the full-frame pass) sees it whole.
                    tol = 0.02 * side
                    if (x0 > 0 and box[0] < x0 + tol) or (y0 > 0 and box[1] < y0 + tol):
                        continue
                    if (x0 + side < w and box[2] > x0 + side - tol) or (y0 + side < h and box[3] > y0 + side - tol):
                        continue
                    cands.append((box, kp, score))
        if not cands:
            return []
        boxes = np.array([c[0] for c in cands], dtype=np.float64)
        kps = np.array([c[1] for c in cands], dtype=np.float64)
        scores = np.array([c[2] for c in cands], dtype=np.float64)
        return _weighted_nms(boxes, kps, scores)

    def _confirm(
        self, frame: np.ndarray, cands: list[tuple[np.ndarray, np.ndarray, float]], factor: float
    ) -> list[tuple[FaceDetection, np.ndarray]]:
        """Scale candidates back to the frame and keep those the mesh model sees a face in."""
        fh, fw = frame.shape[:2]
        found = []
        for box, kp, score in cands:
            x0, y0, x1, y1 = (float(v) for v in box / factor)
            x0, x1 = min(max(x0, 0.0), fw), min(max(x1, 0.0), fw)
            y0, y1 = min(max(y0, 0.0), fh), min(max(y1, 0.0), fh)
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            det = FaceDetection((x0, y0, x1, y1), score, tuple((float(x), float(y)) for x, y in kp / factor))
            result = self._mesh_in_roi(frame, *_roi_from_detection(det))
            if result is None:
                continue
            points, face_logit = result
            # Two weak signals do not make a face: a cat scores 0.55-0.6 here with a mesh
            # logit up to ~3.5, while blurred or half-covered real faces score >= 0.75.
            needed = 0.0 if score >= _WEAK_DETECTION else _SURE_FACE_LOGIT
            if face_logit >= needed:
                found.append((det, points))
        return found

    def _detect_window(
        self, img: np.ndarray, ox: int, oy: int, side: int, min_score: float
    ) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Run BlazeFace on ``img`` letterboxed into a square of ``side`` pixels placed at (ox, oy).

        Returns raw candidates (box (4,), keypoints (6, 2), score) in the coordinates of the
        image ``img`` was cut from. Caller holds the lock.
        """
        h, w = img.shape[:2]
        scale = _DET_SIZE / side
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((_DET_SIZE, _DET_SIZE, 3), dtype=np.uint8)
        px, py = (_DET_SIZE - nw) // 2, (_DET_SIZE - nh) // 2
        canvas[py : py + nh, px : px + nw] = resized
        tensor = canvas.astype(np.float32)[None] / 127.5 - 1.0
        self._det.set_tensor(self._det_in, tensor)
        self._det.invoke()
        raw = self._det.get_tensor(self._det_boxes)[0]
        logits = self._det.get_tensor(self._det_scores)[0, :, 0]
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -100.0, 100.0)))
        keep = np.nonzero(scores >= min_score)[0]
        if keep.size == 0:
            return []
        anchors = _anchors()[keep]
        reg = raw[keep] / _DET_SIZE
        cx = reg[:, 0] + anchors[:, 0]
        cy = reg[:, 1] + anchors[:, 1]
        half_w, half_h = reg[:, 2] / 2, reg[:, 3] / 2
        boxes = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)
        kps = reg[:, 4:16].reshape(-1, 6, 2) + anchors[:, None, :]
        # normalised letterbox coordinates -> pixels of the image the window was cut from
        shift = np.array([px, py], dtype=np.float64)
        origin = np.array([ox, oy], dtype=np.float64)
        boxes = (boxes.reshape(-1, 2, 2) * _DET_SIZE - shift) / scale + origin
        kps = (kps * _DET_SIZE - shift) / scale + origin
        return [(b.reshape(4), k, float(s)) for b, k, s in zip(boxes, kps, scores[keep])]

    # ------------------------------------------------------------------ landmarks

    def mesh(self, rgb: np.ndarray, detection: FaceDetection | None = None) -> np.ndarray | None:
        """The 468 mesh points, (468, 2) float32 frame pixels, or None when there is no face.

        Without ``detection`` the largest detected face is used.
        """
        frame = _check_frame(rgb)
        if detection is None:
            found = self._find(frame, 0.5)
            return found[0][1] if found else None
        result = self._mesh_in_roi(frame, *_roi_from_detection(detection))
        if result is None or result[1] < 0.0:  # sigmoid < 0.5: the model sees no face there
            return None
        return result[0]

    def landmarks68(self, rgb: np.ndarray, detection: FaceDetection | None = None) -> np.ndarray | None:
        """iBUG-68 landmarks, (68, 2) float32 frame pixels, or None when there is no face."""
        points = self.mesh(rgb, detection)
        if points is None:
            return None
        return mesh_to_68(points)

    def _mesh_in_roi(
        self, frame: np.ndarray, centre: np.ndarray, side: float, angle: float
    ) -> tuple[np.ndarray, float] | None:
        """Crop a rotated square ROI to 192x192, run the mesh model, map the points back.

        Returns ((468, 2) float32 frame pixels, face-presence logit), or None when the ROI
        lies outside the frame.
        """
        # crop (continuous) coordinates u in [0, 192) -> frame (continuous) coordinates
        ex = np.array([math.cos(angle), math.sin(angle)])
        ey = np.array([-math.sin(angle), math.cos(angle)])
        k = side / _MESH_SIZE
        origin = centre - (ex + ey) * side / 2
        crop_to_frame = np.stack([ex * k, ey * k, origin], axis=1)  # (2, 3)

        # Large ROIs are shrunk first so the warp does not alias (bilinear skips pixels).
        src, src_map = frame, np.eye(3)
        if k > 2.0:
            corners = (
                crop_to_frame
                @ np.array([[0, 0, 1], [_MESH_SIZE, 0, 1], [0, _MESH_SIZE, 1], [_MESH_SIZE, _MESH_SIZE, 1]]).T
            )
            x0 = int(max(0, math.floor(corners[0].min()) - 2))
            y0 = int(max(0, math.floor(corners[1].min()) - 2))
            x1 = int(min(frame.shape[1], math.ceil(corners[0].max()) + 2))
            y1 = int(min(frame.shape[0], math.ceil(corners[1].max()) + 2))
            if x1 - x0 < 2 or y1 - y0 < 2:
                return None
            f = 1.0 / (k / 1.5)  # leave the warp a 1.5x reduction
            region = frame[y0:y1, x0:x1]
            src = cv2.resize(
                region,
                (max(1, round(region.shape[1] * f)), max(1, round(region.shape[0] * f))),
                interpolation=cv2.INTER_AREA,
            )
            sx, sy = src.shape[1] / region.shape[1], src.shape[0] / region.shape[0]
            src_map = np.array([[sx, 0, -x0 * sx], [0, sy, -y0 * sy], [0, 0, 1]])

        # cv2 wants, for each output pixel index, the input pixel index: both are
        # continuous coordinates minus 0.5.
        to_cont = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
        from_cont = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]])
        full = np.vstack([crop_to_frame, [0, 0, 1]])
        warp = (from_cont @ src_map @ full @ to_cont)[:2]
        crop = cv2.warpAffine(
            src,
            warp,
            (_MESH_SIZE, _MESH_SIZE),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        tensor = crop.astype(np.float32)[None] / 255.0
        with self._lock:
            self._mesh.set_tensor(self._mesh_in, tensor)
            self._mesh.invoke()
            pts = self._mesh.get_tensor(self._mesh_points).reshape(468, 3)[:, :2].astype(np.float64)
            face_logit = float(self._mesh.get_tensor(self._mesh_face).reshape(-1)[0])
        out = pts @ crop_to_frame[:, :2].T + crop_to_frame[:, 2]
        return out.astype(np.float32), face_logit


def mesh_to_68(mesh: np.ndarray) -> np.ndarray:
    """Pick the iBUG-68 points out of a (468, 2+) mesh; returns (68, 2) float32."""
    return np.asarray(mesh)[list(MESH_TO_IBUG68), :2].astype(np.float32)


def _roi_from_detection(det: FaceDetection) -> tuple[np.ndarray, float, float]:
    """Square, eye-aligned ROI for the mesh model: (centre (2,), side, angle in radians).

    The side is 1.5x the longer side of the box, as the mesh model was trained on; the angle
    levels the eyes (BlazeFace keypoints 0 and 1) so a tilted head is seen upright.
    """
    x0, y0, x1, y1 = det.box
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2], dtype=np.float64)
    side = max(x1 - x0, y1 - y0) * _ROI_SCALE
    angle = 0.0
    if det.keypoints is not None and len(det.keypoints) >= 2:
        (rx, ry), (lx, ly) = det.keypoints[0], det.keypoints[1]
        angle = math.atan2(ly - ry, lx - rx)
    return centre, side, angle


def _windows(width: int, height: int, side: int) -> list[tuple[int, int, int]]:
    """Square windows (x0, y0, side) covering a width x height image with 50 % overlap."""

    def starts(length: int) -> list[int]:
        if length <= side:
            return [0]
        steps = math.ceil((length - side) / (side / 2))
        return sorted({min(round(k * side / 2), length - side) for k in range(steps + 1)})

    return [(x, y, side) for y in starts(height) for x in starts(width)]


def _check_frame(rgb: np.ndarray) -> np.ndarray:
    """Reject anything that is not an (H, W, 3) uint8 RGB frame with a clear message."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        desc = f"{rgb.dtype} array of shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise MediaError(f"Face detection needs an (H, W, 3) uint8 RGB frame, got a {desc}.")
    if rgb.shape[0] < 8 or rgb.shape[1] < 8:
        raise MediaError(f"Frame of {rgb.shape[1]}x{rgb.shape[0]} pixels is too small to find a face in.")
    return np.ascontiguousarray(rgb)  # views such as frame[:, ::-1] trip some cv2 calls


def _downscale(frame: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Shrink frames larger than ``max_side`` (e.g. 4K) once; returns (image, scale factor)."""
    h, w = frame.shape[:2]
    if max(h, w) <= max_side:
        return frame, 1.0
    f = max_side / max(h, w)
    return cv2.resize(frame, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA), f
