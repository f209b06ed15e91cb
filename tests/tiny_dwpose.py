"""Tiny ONNX networks with DWPose-l's signature (input 1x3x384x288 -> simcc_x 1x133x576, simcc_y 1x133x768).

Built with the `onnx` package in the real file format, so `DWPose.from_file` loads them
through onnxruntime exactly as it loads ``dw-ll_ucoco_384.onnx``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

K, WX, WY = 133, 576, 768


def _save(path: Path, nodes, inits, in_shape=(1, 3, 384, 288), out_shapes=((1, K, WX), (1, K, WY))) -> Path:
    graph = helper.make_graph(
        nodes,
        "tiny_dwpose",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_shape))],
        [
            helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, list(out_shapes[0])),
            helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, list(out_shapes[1])),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_random_dwpose(path: str | Path, seed: int = 0) -> Path:
    """Random weights: per-channel image means -> linear layers -> the two SimCC outputs."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((3, K * WX)).astype(np.float32), "wx"),
        numpy_helper.from_array(rng.standard_normal((3, K * WY)).astype(np.float32), "wy"),
        numpy_helper.from_array(np.array([1, K, WX], np.int64), "shape_x"),
        numpy_helper.from_array(np.array([1, K, WY], np.int64), "shape_y"),
    ]
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "wx"], ["fx"]),
        helper.make_node("MatMul", ["flat", "wy"], ["fy"]),
        helper.make_node("Reshape", ["fx", "shape_x"], ["simcc_x"]),
        helper.make_node("Reshape", ["fy", "shape_y"], ["simcc_y"]),
    ]
    return _save(Path(path), nodes, inits)


def write_constant_dwpose(path: str | Path, simcc_x: np.ndarray, simcc_y: np.ndarray) -> Path:
    """Outputs fixed SimCC vectors (133x576, 133x768) whatever the image (input x 0 is added)."""
    inits = [
        numpy_helper.from_array(simcc_x.reshape(1, K, WX).astype(np.float32), "cx"),
        numpy_helper.from_array(simcc_y.reshape(1, K, WY).astype(np.float32), "cy"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["cx", "nothing"], ["simcc_x"]),
        helper.make_node("Add", ["cy", "nothing"], ["simcc_y"]),
    ]
    return _save(Path(path), nodes, inits)


def write_wrong_shape_dwpose(path: str | Path) -> Path:
    """A 256x192 RTMPose-style network: valid ONNX, wrong model."""
    inits = [
        numpy_helper.from_array(np.zeros((3, K * 384), np.float32), "w"),
        numpy_helper.from_array(np.array([1, K, 384], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["f"]),
        helper.make_node("Reshape", ["f", "shape"], ["simcc_x"]),
        helper.make_node("Identity", ["simcc_x"], ["simcc_y"]),
    ]
    return _save(Path(path), nodes, inits, in_shape=(1, 3, 256, 192), out_shapes=((1, K, 384), (1, K, 384)))


def peaks(bins: np.ndarray, width: int, sigma: float = 3.0) -> np.ndarray:
    """(n,) bins -> (n, width) Gaussian-shaped SimCC vectors peaking there (values 0..1)."""
    grid = np.arange(width)[None, :]
    return np.exp(-((grid - np.asarray(bins)[:, None]) ** 2) / (2 * sigma**2)).astype(np.float32)


def symmetric_face_bins(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """SimCC bins of a left-right symmetric face: partners at x-bins b and 575 - b, same y-bin.

    A midline point (its own mirror) cannot sit on the centre (bin 287.5): the two passes of
    the flip test give it equal peaks at b and 575 - b, and the argmax takes the first, b.
    """
    from musetalk.face.dwpose import FACE_MIRROR

    rng = np.random.default_rng(seed)
    bx = np.zeros(68, np.int64)
    by = np.zeros(68, np.int64)
    for k in range(68):
        j = FACE_MIRROR[k]
        if j < k:
            continue
        b = int(rng.integers(150, 280))  # left of the centre line
        bx[j], bx[k] = 575 - b, b
        by[k] = by[j] = int(rng.integers(250, 520))
    return bx, by


def write_symmetric_face_dwpose(path: str | Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Constant network whose face keypoints (23..90) peak at `symmetric_face_bins`; returns the bins.

    Whatever the image, a constant network answers the mirrored pass of the flip test with
    the same vectors; for a symmetric face those are exactly what a mirrored image would give.
    """
    from musetalk.face.dwpose import FACE_FIRST

    bx, by = symmetric_face_bins(seed)
    sx = np.full((K, WX), -0.1, np.float32)
    sy = np.full((K, WY), -0.1, np.float32)
    sx[FACE_FIRST : FACE_FIRST + 68] = peaks(bx, WX)
    sy[FACE_FIRST : FACE_FIRST + 68] = peaks(by, WY)
    write_constant_dwpose(path, sx, sy)
    return bx, by
