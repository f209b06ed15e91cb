"""DWPose whole-body landmarks (the official MuseTalk landmark source) on onnxruntime.

MuseTalk v1.5 gets its 68 face points from DWPose (RTMPose-l, 133 COCO-WholeBody keypoints)
run top-down through mmpose with the whole frame as the person box. This module reproduces
that inference on the public ONNX export ``dw-ll_ucoco_384.onnx`` without mmpose/mmcv:

1. box = the whole frame ``[0, 0, W, H]``; centre = its middle, scale = size x 1.25;
   the scale is widened or heightened to the input's 3:4 aspect (288 wide x 384 high);
2. affine warp (bilinear, black border) mapping the centre to the input centre and the
   scale's width onto 288 pixels; RGB normalised with ImageNet mean/std (0-255 range);
3. flip test, as the model's config asks (``test_cfg.flip_test=True``): the input mirrored
   left-right is run too; its SimCC vectors are reversed along x, re-indexed to the
   symmetric keypoints, and averaged with the direct ones;
4. SimCC decoding: argmax bin / 2.0 (split ratio) in input pixels (a keypoint whose best
   score is <= 0 decodes to bin -1, as mmpose does), then mapped back to the frame with
   ``p / input_size * scale + centre - scale / 2``;
5. face = keypoints 23..90, the 68 iBUG points.

rtmlib runs the same ONNX files but has no flip test, so it does not give the official points.
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from musetalk.errors import MissingWeightsError

DWPOSE_FILE = "dw-ll_ucoco_384.onnx"
SUBDIR = "dwpose"
HUB_REPO = "yzd-v/DWPose"
FETCH_COMMAND = "bash download_weights.sh"
INPUT_W, INPUT_H = 288, 384
SIMCC_SPLIT_RATIO = 2.0
BOX_PADDING = 1.25
NUM_KEYPOINTS = 133
FACE_FIRST = 23  # keypoints 23..90 are the face, in iBUG-68 order
MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)  # RGB
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def _ibug_mirror() -> tuple[int, ...]:
    """For each iBUG-68 point, the point it becomes when the face is mirrored left-right."""
    m = list(range(68))

    def swap(pairs):
        for a, b in pairs:
            m[a], m[b] = b, a

    swap((i, 16 - i) for i in range(8))  # jaw 0..16 (8 = chin stays)
    swap((17 + i, 26 - i) for i in range(5))  # brows
    swap(((31, 35), (32, 34)))  # nose bottom (33 stays; bridge 27-30 stays)
    swap(((36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)))  # eyes
    swap(((48, 54), (49, 53), (50, 52), (55, 59), (56, 58)))  # outer lips (51, 57 stay)
    swap(((60, 64), (61, 63), (65, 67)))  # inner lips (62, 66 stay)
    return tuple(m)


FACE_MIRROR = _ibug_mirror()


def frame_box_center_scale(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole-frame person box -> (centre (2,), scale (2,)) float32, padded and at 3:4 aspect."""
    box = np.array([0, 0, width, height], dtype=np.float32)
    centre = np.array([(box[0] + box[2]) * 0.5, (box[1] + box[3]) * 0.5], dtype=np.float32)
    scale = np.array([box[2] - box[0], box[3] - box[1]], dtype=np.float32) * np.float32(BOX_PADDING)
    aspect = INPUT_W / INPUT_H
    w, h = float(scale[0]), float(scale[1])
    scale = np.array([w, w / aspect] if w > h * aspect else [h * aspect, h], dtype=np.float32)
    return centre, scale


def warp_matrix(centre: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(2, 3) affine taking frame pixels to input pixels: centre -> input centre, scale[0] -> 288.

    Built from three point pairs (centre, a point half a box-width left of it, and that
    offset turned 90 degrees) with ``cv2.getAffineTransform`` in float32, as mmpose does.
    """
    c = np.asarray(centre, np.float32)
    left = np.array([-scale[0] * 0.5, 0.0], dtype=np.float32)
    dst_c = np.array([INPUT_W * 0.5, INPUT_H * 0.5], dtype=np.float32)
    dst_left = np.array([-INPUT_W * 0.5, 0.0], dtype=np.float32)

    def third(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = a - b
        return b + np.array([-d[1], d[0]], dtype=np.float32)

    src = np.stack([c, c + left, third(c, c + left)]).astype(np.float32)
    dst = np.stack([dst_c, dst_c + dst_left, third(dst_c, dst_c + dst_left)]).astype(np.float32)
    return cv2.getAffineTransform(src, dst)


def preprocess(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB frame -> (input (1, 3, 384, 288) float32, centre (2,), scale (2,))."""
    h, w = rgb.shape[:2]
    centre, scale = frame_box_center_scale(w, h)
    warped = cv2.warpAffine(rgb, warp_matrix(centre, scale), (INPUT_W, INPUT_H), flags=cv2.INTER_LINEAR)
    x = (warped.astype(np.float32) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), centre, scale


def flip_average(
    simcc_x: np.ndarray, simcc_y: np.ndarray, flip_x: np.ndarray, flip_y: np.ndarray, mirror: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Average direct (K, Wx)/(K, Wy) SimCC vectors with those of the mirrored input.

    Keypoint k of the mirrored image is keypoint ``mirror[k]`` of the original; its x
    vector is reversed (bin b of a mirrored input is bin Wx - 1 - b).
    """
    idx = np.asarray(mirror)
    return (simcc_x + flip_x[idx, ::-1]) * 0.5, (simcc_y + flip_y[idx]) * 0.5


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, Wx), (K, Wy) -> (keypoints (K, 2) input pixels, scores (K,)).

    Argmax bins divided by the split ratio; score = the smaller of the two maxima; a keypoint
    with score <= 0 gets bin -1 on both axes, as mmpose's ``get_simcc_maximum`` does.
    """
    bx, by = np.argmax(simcc_x, axis=1), np.argmax(simcc_y, axis=1)
    vx, vy = simcc_x[np.arange(len(bx)), bx], simcc_y[np.arange(len(by)), by]
    scores = np.minimum(vx, vy)
    locs = np.stack([bx, by], axis=1).astype(np.float32)
    locs[scores <= 0] = -1
    return locs / np.float32(SIMCC_SPLIT_RATIO), scores


def to_frame(points: np.ndarray, centre: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(K, 2) input pixels -> frame pixels: ``p / (288, 384) * scale + centre - scale / 2``.

    Worked in float64 from the float32 values and stored as float32, as mmpose does (its
    integer input size promotes the arithmetic; the result is written into a float32 array),
    so a point that lands on a whole pixel truncates the same way.
    """
    size = np.array([INPUT_W, INPUT_H], dtype=np.int64)
    c, s = np.asarray(centre, np.float32).astype(np.float64), np.asarray(scale, np.float32).astype(np.float64)
    return (np.asarray(points, np.float32) / size * s + c - 0.5 * s).astype(np.float32)


def dwpose_path(models_dir: str | Path) -> Path:
    """Where the ONNX file lives: ``<models>/dwpose/dw-ll_ucoco_384.onnx``."""
    return Path(models_dir) / SUBDIR / DWPOSE_FILE


class DWPose:
    """DWPose-l on onnxruntime; one session, calls serialised by a lock (sessions are thread-safe,
    but the lock keeps a single preparation from oversubscribing the CPU)."""

    def __init__(self, session, path: Path):
        """Wrap a checked session; use `from_file`."""
        self._session = session
        self._input = session.get_inputs()[0].name
        self._outputs = _simcc_outputs(session)
        self.path = path
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path, *, device: str = "cpu", fetch_command: str = FETCH_COMMAND) -> DWPose:
        """Load and check the ONNX file; `MissingWeightsError` naming it and the fetch command if unusable.

        ``device`` "cuda" uses onnxruntime-gpu's CUDA provider when it is installed.
        """
        import onnxruntime as ort

        path = Path(path)
        root = str(path.parent.parent)

        def fail(problem: str) -> MissingWeightsError:
            return MissingWeightsError([problem], root, fetch_command)

        if not path.is_file() or path.stat().st_size == 0:
            raise fail(f"{path} is missing (DWPose landmarks, {HUB_REPO}/{DWPOSE_FILE})")
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise fail(
                f"{path} is not a loadable ONNX model ({' '.join(str(exc).split())[:200]}); delete it and fetch it again"
            ) from exc
        problem = _signature_problem(session)
        if problem:
            raise fail(f"{path} is not the DWPose-l 384x288 model ({problem}); delete it and fetch it again")
        return cls(session, path)

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            out = self._session.run(self._outputs, {self._input: x})
        return np.asarray(out[0], np.float32)[0], np.asarray(out[1], np.float32)[0]

    def keypoints(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 RGB -> face keypoints (68, 2) float32 frame pixels and their scores (68,)."""
        x, centre, scale = preprocess(rgb)
        sx, sy = self._run(x)
        fx, fy = self._run(np.ascontiguousarray(x[..., ::-1]))
        face = slice(FACE_FIRST, FACE_FIRST + 68)
        mirror = np.asarray(FACE_MIRROR)
        ax, ay = flip_average(sx[face], sy[face], fx[face], fy[face], mirror)
        points, scores = decode_simcc(ax, ay)
        return to_frame(points, centre, scale), scores

    def landmarks68(self, rgb: np.ndarray) -> np.ndarray:
        """iBUG-68 face landmarks of the (whole-frame) person, (68, 2) float32 frame pixels."""
        return self.keypoints(rgb)[0]


def _simcc_outputs(session) -> list[str]:
    """Names of the (simcc_x, simcc_y) outputs, told apart by their last dimension (576, 768)."""
    by_width = {out.shape[-1]: out.name for out in session.get_outputs() if out.shape}
    return [by_width[int(INPUT_W * SIMCC_SPLIT_RATIO)], by_width[int(INPUT_H * SIMCC_SPLIT_RATIO)]]


def _signature_problem(session) -> str | None:
    """Why a session is not DWPose-l 384x288 (input 1x3x384x288 -> simcc_x 1x133x576, simcc_y 1x133x768), or None."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 2:
        return f"{len(inputs)} inputs and {len(outputs)} outputs, expected 1 and 2"
    want_in = [1, 3, INPUT_H, INPUT_W]
    want_x = [1, NUM_KEYPOINTS, int(INPUT_W * SIMCC_SPLIT_RATIO)]
    want_y = [1, NUM_KEYPOINTS, int(INPUT_H * SIMCC_SPLIT_RATIO)]

    def fits(shape, want) -> bool:
        return len(shape) == len(want) and all(not isinstance(s, int) or s == w for s, w in zip(shape, want))

    if not fits(inputs[0].shape, want_in):
        return f"input shape {inputs[0].shape}, expected {want_in}"
    shapes = sorted((list(out.shape) for out in outputs), key=lambda shape: str(shape[-1]))
    if not (fits(shapes[0], want_x) and fits(shapes[1], want_y)) and not (
        fits(shapes[1], want_x) and fits(shapes[0], want_y)
    ):
        return f"output shapes {[out.shape for out in outputs]}, expected {want_x} and {want_y}"
    return None
