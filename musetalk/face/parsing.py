"""BiSeNet face parsing (19 CelebAMask-HQ classes), used to build the blend mask.

The module tree mirrors the public face-parsing.PyTorch checkpoint `79999_iter.pth` so that
the plain state dict loads with `strict=True`: a ResNet-18 context path (`cp.resnet.*`), two
attention refinement modules (`cp.arm16`, `cp.arm32`), a global-context branch
(`cp.conv_avg`), two refinement heads (`cp.conv_head32`, `cp.conv_head16`), a feature fusion
module (`ffm.*`) and three output heads (`conv_out`, `conv_out16`, `conv_out32`). The
spatial path of the paper is absent: the 1/8 ResNet feature takes its place, as in the
checkpoint. At `base_channels=64` it has 13,300,416 parameters (13,150,272 without the two
auxiliary heads, which inference never needs).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from musetalk.errors import MissingWeightsError

CHECKPOINT_NAME = "79999_iter.pth"
PARSE_SIZE = 512
NUM_CLASSES = 19

# CelebAMask-HQ label order used by face-parsing.PyTorch (index = class id).
CLASS_NAMES: tuple[str, ...] = (
    "background",
    "skin",
    "l_brow",
    "r_brow",
    "l_eye",
    "r_eye",
    "eye_g",
    "l_ear",
    "r_ear",
    "ear_r",
    "nose",
    "mouth",
    "u_lip",
    "l_lip",
    "neck",
    "neck_l",
    "cloth",
    "hair",
    "hat",
)
SKIN, NOSE, MOUTH, UPPER_LIP, LOWER_LIP = 1, 10, 11, 12, 13

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- network


class _ConvBNReLU(nn.Module):
    """conv (no bias) -> BN -> ReLU; names `conv`, `bn` as in the checkpoint."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class _BasicBlock(nn.Module):
    """ResNet basic block; `downsample` is a (conv1x1, BN) Sequential when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Sequential | None = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + y)


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1))


class _ResNet18Trunk(nn.Module):
    """ResNet-18 without the classifier; returns the 1/8, 1/16 and 1/32 features."""

    def __init__(self, width: int):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _stage(w, w, 1)
        self.layer2 = _stage(w, 2 * w, 2)
        self.layer3 = _stage(2 * w, 4 * w, 2)
        self.layer4 = _stage(4 * w, 8 * w, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        f8 = self.layer2(x)
        f16 = self.layer3(f8)
        f32 = self.layer4(f16)
        return f8, f16, f32


class _AttentionRefinement(nn.Module):
    """3x3 conv, then channel attention from the globally pooled feature."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _ConvBNReLU(cin, cout, 3, 1, 1)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        att = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * att


class _ContextPath(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        w = width
        self.resnet = _ResNet18Trunk(w)
        self.arm16 = _AttentionRefinement(4 * w, 2 * w)
        self.arm32 = _AttentionRefinement(8 * w, 2 * w)
        self.conv_head32 = _ConvBNReLU(2 * w, 2 * w, 3, 1, 1)
        self.conv_head16 = _ConvBNReLU(2 * w, 2 * w, 3, 1, 1)
        self.conv_avg = _ConvBNReLU(8 * w, 2 * w, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f8, f16, f32 = self.resnet(x)
        glob = self.conv_avg(F.adaptive_avg_pool2d(f32, 1))
        glob = F.interpolate(glob, size=f32.shape[2:], mode="nearest")
        up32 = F.interpolate(self.arm32(f32) + glob, size=f16.shape[2:], mode="nearest")
        up32 = self.conv_head32(up32)
        up16 = F.interpolate(self.arm16(f16) + up32, size=f8.shape[2:], mode="nearest")
        up16 = self.conv_head16(up16)
        return f8, up16, up32  # 1/8, 1/8, 1/16


class _FeatureFusion(nn.Module):
    """Concatenate, 1x1 conv, then add a squeeze-excitation reweighted copy."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = _ConvBNReLU(cin, cout, 1, 1, 0)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([a, b], dim=1))
        att = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat + feat * att


class _OutputHead(nn.Module):
    def __init__(self, cin: int, mid: int, n_classes: int):
        super().__init__()
        self.conv = _ConvBNReLU(cin, mid, 3, 1, 1)
        self.conv_out = nn.Conv2d(mid, n_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """Face-parsing BiSeNet; `base_channels=64` is the public checkpoint's width."""

    def __init__(self, n_classes: int = NUM_CLASSES, base_channels: int = 64):
        super().__init__()
        w = base_channels
        self.base_channels = w
        self.cp = _ContextPath(w)
        self.ffm = _FeatureFusion(4 * w, 4 * w)
        self.conv_out = _OutputHead(4 * w, 4 * w, n_classes)
        self.conv_out16 = _OutputHead(2 * w, w, n_classes)
        self.conv_out32 = _OutputHead(2 * w, w, n_classes)

    def forward(self, x: torch.Tensor, aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """(N,3,H,W) normalised -> (N,classes,H,W) logits; with `aux` also the two side heads.

        Only the main head is used at inference, so the side heads are skipped by default.
        """
        size = x.shape[2:]
        f8, cp8, cp16 = self.cp(x)
        out = self.conv_out(self.ffm(f8, cp8))
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=True)
        if not aux:
            return out
        o16 = F.interpolate(self.conv_out16(cp8), size=size, mode="bilinear", align_corners=True)
        o32 = F.interpolate(self.conv_out32(cp16), size=size, mode="bilinear", align_corners=True)
        return out, o16, o32


# --------------------------------------------------------------------------- loading


def _is_batch_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _check_state_dict(state: object, path: Path) -> tuple[BiSeNet | None, list[str]]:
    """Build the net at the checkpoint's width and list every problem (none: loads strictly)."""
    if not isinstance(state, dict) or not state:
        return None, [f"{path}: not a plain state dict (got {type(state).__name__})"]
    conv1 = state.get("cp.resnet.conv1.weight")
    if not isinstance(conv1, torch.Tensor) or conv1.ndim != 4 or conv1.shape[0] < 4:
        return None, [f"{path}: no usable 'cp.resnet.conv1.weight'; not a BiSeNet face-parsing checkpoint"]
    net = BiSeNet(NUM_CLASSES, int(conv1.shape[0]))
    expected = net.state_dict()
    problems: list[str] = []

    missing = [k for k in expected if k not in state and not _is_batch_counter(k)]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and (not isinstance(v, torch.Tensor) or v.shape != expected[k].shape)
    ]
    nonfinite = [
        k
        for k, v in state.items()
        if k in expected and isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", wrong),
        ("non-finite values in", nonfinite),
    ):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{path}: {len(items)} {label}: {shown}")
    return net, problems


class FaceParser:
    """Loaded BiSeNet plus the original preprocessing (512x512 bilinear, ImageNet norm)."""

    def __init__(
        self,
        net: BiSeNet,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = None,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        # On CPU one image per forward pass was fastest (measured: 95 ms/img at batch 1, 130 at 4).
        auto = 1 if self.device.type == "cpu" else 8
        self.batch_size = max(1, int(batch_size)) if batch_size is not None else auto
        self.net = net.to(device=self.device, dtype=dtype).eval()
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(_IMAGENET_MEAN, device=self.device, dtype=dtype).view(shape)
        self._std = torch.tensor(_IMAGENET_STD, device=self.device, dtype=dtype).view(shape)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> FaceParser:
        """Load `<directory>/79999_iter.pth`; every problem becomes one MissingWeightsError."""
        directory = Path(directory)
        path = directory / CHECKPOINT_NAME
        if not path.is_file():
            raise MissingWeightsError([f"{path}: file not found"], str(directory))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated zip/pickle streams raise many different types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MissingWeightsError(
                [f"{path}: unreadable or truncated ({path.stat().st_size} bytes; {reason})"], str(directory)
            ) from exc
        net, problems = _check_state_dict(state, path)
        if problems or net is None:
            raise MissingWeightsError(problems, str(directory))
        full = net.state_dict()
        # Old checkpoints may lack BN batch counters; they do not affect eval-mode output.
        state = {**{k: v for k, v in full.items() if _is_batch_counter(k)}, **state}
        net.load_state_dict(state, strict=True)
        return cls(net, device=device, dtype=dtype)

    def _batches(self, rgb: np.ndarray) -> Iterator[torch.Tensor]:
        """Yield normalised (B,3,512,512) tensors; PIL bilinear matches the original resize."""
        for start in range(0, len(rgb), self.batch_size):
            chunk = rgb[start : start + self.batch_size]
            if chunk.shape[1:3] != (PARSE_SIZE, PARSE_SIZE):
                chunk = np.stack(
                    [np.asarray(Image.fromarray(img).resize((PARSE_SIZE, PARSE_SIZE), Image.BILINEAR)) for img in chunk]
                )
            x = torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device)
            x = x.permute(0, 3, 1, 2).to(self.dtype) / 255.0
            yield (x - self._mean) / self._std

    @staticmethod
    def _as_batch(rgb_crops: np.ndarray) -> tuple[np.ndarray, bool]:
        arr = np.asarray(rgb_crops)
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or arr.shape[-1] != 3:
            raise ValueError(f"expected (H,W,3) or (N,H,W,3) uint8 RGB, got shape {arr.shape} dtype {arr.dtype}")
        return (arr[None], True) if arr.ndim == 3 else (arr, False)

    @torch.inference_mode()
    def parse_512(self, rgb_crops: np.ndarray) -> np.ndarray:
        """(N,H,W,3) or (H,W,3) uint8 RGB -> (N,512,512) or (512,512) uint8 class ids.

        The blend-mask rules (kernel sizes, cheek bands) are defined in this 512-px space.
        """
        batch, single = self._as_batch(rgb_crops)
        out = np.empty((len(batch), PARSE_SIZE, PARSE_SIZE), dtype=np.uint8)
        n = 0
        for x in self._batches(batch):
            labels = self.net(x).argmax(dim=1).to(torch.uint8).cpu().numpy()
            out[n : n + len(labels)] = labels
            n += len(labels)
        return out[0] if single else out

    def parse(self, rgb_crops: np.ndarray) -> np.ndarray:
        """(N,H,W,3) or (H,W,3) uint8 RGB -> (N,H,W) or (H,W) uint8 class ids at input size."""
        batch, single = self._as_batch(rgb_crops)
        labels = self.parse_512(batch)
        h, w = batch.shape[1:3]
        if (h, w) != (PARSE_SIZE, PARSE_SIZE):
            labels = np.stack([_resize_labels(lab, (h, w)) for lab in labels])
        return labels[0] if single else labels


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (h,w) label map to `size` = (h, w)."""
    h, w = size
    return np.asarray(Image.fromarray(labels).resize((w, h), Image.NEAREST))


def save_random_parser(directory: str | Path, base_channels: int = 8, seed: int = 0) -> Path:
    """Write a small random checkpoint with the real key names (test fixtures, no downloads)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = BiSeNet(NUM_CLASSES, base_channels)
        # Non-trivial BN statistics so that a loader which ignored them would be caught.
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0.0, 0.1)
    path = directory / CHECKPOINT_NAME
    torch.save(net.state_dict(), path)
    return path


def parameter_count(net: nn.Module) -> int:
    """Number of learnable parameters (13,300,416 for the public checkpoint's net)."""
    return int(sum(math.prod(p.shape) for p in net.parameters()))
