"""Face parsing (BiSeNet) and MuseTalk v1.5 blend masks, with real tensors and images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from musetalk.errors import ConfigError, MissingWeightsError
from musetalk.face.box import cut_square, square_crop_box
from musetalk.face.mask import (
    MaskSettings,
    blend_mask,
    blend_masks_batch,
    blur_kernel_size,
    frame_blend_masks,
    inpainting_line,
    parsing_to_face_mask,
    polygon_face_mask,
)
from musetalk.face.parsing import (
    CHECKPOINT_NAME,
    CLASS_NAMES,
    BiSeNet,
    FaceParser,
    parameter_count,
    save_random_parser,
)

# Shapes of the public face-parsing.PyTorch checkpoint 79999_iter.pth (from its model.py and
# resnet.py: ResNet-18 trunk, ARMs 256->128 and 512->128, FFM 256, heads 256/64/64, 19 classes).
KNOWN_SHAPES = {
    "cp.resnet.conv1.weight": (64, 3, 7, 7),
    "cp.resnet.bn1.running_mean": (64,),
    "cp.resnet.layer1.0.conv1.weight": (64, 64, 3, 3),
    "cp.resnet.layer1.1.bn2.weight": (64,),
    "cp.resnet.layer2.0.conv1.weight": (128, 64, 3, 3),
    "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "cp.resnet.layer2.0.downsample.1.running_var": (128,),
    "cp.resnet.layer3.0.downsample.0.weight": (256, 128, 1, 1),
    "cp.resnet.layer4.0.conv1.weight": (512, 256, 3, 3),
    "cp.resnet.layer4.1.conv2.weight": (512, 512, 3, 3),
    "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
    "cp.arm16.conv.bn.weight": (128,),
    "cp.arm16.conv_atten.weight": (128, 128, 1, 1),
    "cp.arm16.bn_atten.running_mean": (128,),
    "cp.arm32.conv.conv.weight": (128, 512, 3, 3),
    "cp.conv_head32.conv.weight": (128, 128, 3, 3),
    "cp.conv_head16.bn.bias": (128,),
    "cp.conv_avg.conv.weight": (128, 512, 1, 1),
    "ffm.convblk.conv.weight": (256, 256, 1, 1),
    "ffm.convblk.bn.running_var": (256,),
    "ffm.conv1.weight": (64, 256, 1, 1),
    "ffm.conv2.weight": (256, 64, 1, 1),
    "conv_out.conv.conv.weight": (256, 256, 3, 3),
    "conv_out.conv_out.weight": (19, 256, 1, 1),
    "conv_out16.conv.conv.weight": (64, 128, 3, 3),
    "conv_out16.conv_out.weight": (19, 64, 1, 1),
    "conv_out32.conv.conv.weight": (64, 128, 3, 3),
    "conv_out32.conv_out.weight": (19, 64, 1, 1),
}

ASTRONAUT_FACE_BOX = (175, 80, 280, 200)  # x0, y0, x1, y1 in skimage's 512x512 astronaut


def crop_box_for(face_box: tuple[int, int, int, int], expand: float = 1.5) -> tuple[int, int, int, int]:
    """The official crop: a square of half side int(max(w,h)//2*expand) around the box centre."""
    x0, y0, x1, y1 = face_box
    xc, yc = (x0 + x1) // 2, (y0 + y1) // 2
    s = int(max(x1 - x0, y1 - y0) // 2 * expand)
    return xc - s, yc - s, xc + s, yc + s


def to_crop(face_box, crop_box):
    return (face_box[0] - crop_box[0], face_box[1] - crop_box[1], face_box[2] - crop_box[0], face_box[3] - crop_box[1])


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skdata.astronaut()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("face-parse-bisent")
    save_random_parser(d, base_channels=8, seed=0)
    return d


@pytest.fixture(scope="module")
def tiny_parser(tiny_dir) -> FaceParser:
    return FaceParser.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def skin_parser(tmp_path_factory) -> FaceParser:
    """A real tiny BiSeNet whose main head scores only 'skin' (features are post-ReLU >= 0)."""
    d = tmp_path_factory.mktemp("skin-parser")
    path = save_random_parser(d, base_channels=8, seed=1)
    state = torch.load(path, weights_only=True)
    w = torch.zeros_like(state["conv_out.conv_out.weight"])
    w[1] = 1.0
    state["conv_out.conv_out.weight"] = w
    torch.save(state, path)
    return FaceParser.from_pretrained(d)


# --------------------------------------------------------------------------- parsing


def test_class_names_follow_celebamask_hq_order():
    assert len(CLASS_NAMES) == 19
    assert CLASS_NAMES[1] == "skin" and CLASS_NAMES[10] == "nose"
    assert CLASS_NAMES[11:14] == ("mouth", "u_lip", "l_lip")
    assert CLASS_NAMES[17:] == ("hair", "hat")


def test_full_size_architecture_matches_public_checkpoint():
    net = BiSeNet()
    state = net.state_dict()
    for key, shape in KNOWN_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    learnable = [k for k in state if not k.endswith("num_batches_tracked")]
    # 100 tensors in the ResNet-18 trunk, 20 in the ARMs, 15 in the context heads, 7 in the
    # FFM, 18 in the three output heads; plus one batch counter per BatchNorm (31).
    assert len(learnable) == 160
    assert len(state) == 191
    assert {k.split(".")[0] for k in state} == {"cp", "ffm", "conv_out", "conv_out16", "conv_out32"}
    downsample = sorted({k.rsplit(".", 2)[0] for k in state if ".downsample." in k})
    assert downsample == [f"cp.resnet.layer{i}.0.downsample" for i in (2, 3, 4)]
    assert not any("fc" in k.split(".") or ".sp." in k for k in state)
    assert parameter_count(net) == 13_300_416
    aux = parameter_count(net.conv_out16) + parameter_count(net.conv_out32)
    assert parameter_count(net) - aux == 13_150_272


def test_forward_outputs_full_size_small_input():
    net = BiSeNet().eval()
    with torch.inference_mode():
        main, o16, o32 = net(torch.randn(1, 3, 64, 96), aux=True)
        only = net(torch.randn(1, 3, 64, 96))
    assert main.shape == o16.shape == o32.shape == (1, 19, 64, 96)
    assert only.shape == (1, 19, 64, 96)


def test_tiny_random_checkpoint_loads_strictly(tiny_dir, tiny_parser):
    saved = torch.load(tiny_dir / CHECKPOINT_NAME, weights_only=True)
    assert saved["cp.resnet.conv1.weight"].shape == (8, 3, 7, 7)
    assert set(saved) == set(BiSeNet(base_channels=8).state_dict())
    assert tiny_parser.net.base_channels == 8
    loaded = tiny_parser.net.state_dict()
    assert set(loaded) == set(saved)
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k
    # random weights are deterministic per seed
    again = save_random_parser(tiny_dir.parent / "again", base_channels=8, seed=0)
    assert torch.equal(torch.load(again, weights_only=True)["ffm.conv1.weight"], saved["ffm.conv1.weight"])


def test_checkpoint_without_batch_counters_still_loads(tmp_path):
    path = save_random_parser(tmp_path, base_channels=8)
    state = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    assert FaceParser.from_pretrained(tmp_path).net.base_channels == 8


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        FaceParser.from_pretrained(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / CHECKPOINT_NAME) in msg and "not found" in msg
    assert "bash download_weights.sh" in msg


def test_truncated_checkpoint_names_the_file(tmp_path):
    path = save_random_parser(tmp_path, base_channels=8)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MissingWeightsError) as err:
        FaceParser.from_pretrained(tmp_path)
    assert str(path) in str(err.value) and "truncated" in str(err.value)


def test_garbage_checkpoint_names_the_file(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(MissingWeightsError) as err:
        FaceParser.from_pretrained(tmp_path)
    assert str(path) in str(err.value)


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    path = save_random_parser(tmp_path, base_channels=8)
    state = torch.load(path, weights_only=True)
    state["conv_out.conv_out.weight"] = torch.zeros(18, 32, 1, 1)  # wrong class count
    del state["ffm.conv2.weight"]
    state["cp.sp.conv1.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(MissingWeightsError) as err:
        FaceParser.from_pretrained(tmp_path)
    msg = str(err.value)
    assert str(path) in msg
    assert "conv_out.conv_out.weight (18, 32, 1, 1) (expected (19, 32, 1, 1))" in msg
    assert "missing keys: ffm.conv2.weight" in msg
    assert "unexpected keys: cp.sp.conv1.weight" in msg
    assert len(err.value.problems) == 3


def test_other_network_checkpoint_is_rejected(tmp_path):
    torch.save({"conv_in.weight": torch.zeros(320, 8, 3, 3)}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(MissingWeightsError, match="cp.resnet.conv1.weight"):
        FaceParser.from_pretrained(tmp_path)


def test_parse_shapes_and_dtype(tiny_parser, astronaut):
    one = tiny_parser.parse(astronaut)
    assert one.shape == (512, 512) and one.dtype == np.uint8
    assert one.max() < 19
    crops = np.stack([astronaut[60:360, 120:380], astronaut[100:400, 100:360]])  # (2,300,260,3)
    many = tiny_parser.parse(crops)
    assert many.shape == (2, 300, 260) and many.dtype == np.uint8
    assert np.array_equal(many[0], tiny_parser.parse(crops[0]))
    at512 = tiny_parser.parse_512(crops)
    assert at512.shape == (2, 512, 512) and at512.dtype == np.uint8
    with pytest.raises(ValueError):
        tiny_parser.parse(astronaut.astype(np.float32))


def test_parse_sees_the_input(tiny_parser, astronaut):
    """Different images give different label maps (the preprocessing reaches the net)."""
    a = tiny_parser.parse_512(astronaut)
    b = tiny_parser.parse_512(np.ascontiguousarray(astronaut[::-1]))
    assert not np.array_equal(a, b)


# --------------------------------------------------------------------------- masks


def synthetic_face_labels() -> np.ndarray:
    """A hand-drawn 512x512 parsing: skin oval, nose, mouth with both lips."""
    lab = np.zeros((512, 512), np.uint8)
    cv2.ellipse(lab, (256, 250), (170, 220), 0, 0, 360, 1, -1)  # skin, x 86..426, y 30..470
    cv2.ellipse(lab, (256, 250), (28, 45), 0, 0, 360, 10, -1)  # nose
    cv2.ellipse(lab, (256, 360), (60, 14), 0, 180, 360, 12, -1)  # upper lip
    cv2.ellipse(lab, (256, 360), (60, 18), 0, 0, 180, 13, -1)  # lower lip
    cv2.line(lab, (200, 360), (312, 360), 11, 2)  # mouth opening
    return lab


def row_extent(mask: np.ndarray, row: int) -> tuple[int, int]:
    cols = np.flatnonzero(mask[row])
    return int(cols[0]), int(cols[-1])


def test_jaw_mode_regions_on_synthetic_parsing():
    lab = synthetic_face_labels()
    jaw = parsing_to_face_mask(lab, "jaw", cheek_width=90)
    raw = parsing_to_face_mask(lab, "raw", cheek_width=90)
    assert jaw.shape == (512, 512) and jaw.dtype == np.uint8
    assert set(np.unique(jaw)) == {0, 255}
    # nose absent, mouth and lips present
    assert not jaw[lab == 10].any() and not raw[lab == 10].any()
    assert (jaw[np.isin(lab, (11, 12, 13))] == 255).all()
    # cheeks (outside the centre band) are pulled in from the face sides ...
    raw_l, raw_r = row_extent(raw, 300)
    cheek_l, cheek_r = row_extent(jaw, 300)
    assert cheek_l - raw_l >= 15 and raw_r - cheek_r >= 15
    # ... while the centre band is grown: near the chin, where the oval is narrower than the
    # band, the mask is wider than the parsed skin, and the chin reaches lower
    raw_l, raw_r = row_extent(raw, 450)
    jaw_l, jaw_r = row_extent(jaw, 450)
    assert jaw_l < raw_l and jaw_r > raw_r
    raw_bottom = int(np.flatnonzero(raw[:, 256])[-1])
    jaw_bottom = int(np.flatnonzero(jaw[:, 256])[-1])
    assert 5 <= jaw_bottom - raw_bottom <= 20
    # the cheek band edge is 90 px from the centre: a wider band keeps more cheek
    wide = parsing_to_face_mask(lab, "jaw", cheek_width=200)
    assert row_extent(wide, 300)[0] < cheek_l
    # raw (v1) mode is the parsed skin plus mouth and lips, nothing grown
    assert np.array_equal(raw > 0, np.isin(lab, (1, 11, 12, 13)))
    with pytest.raises(ValueError):
        parsing_to_face_mask(lab, "polygon", 90)


def test_polygon_face_mask():
    square = np.array([[10, 10], [50, 10], [50, 40], [10, 40]], dtype=np.float32)
    m = polygon_face_mask(square, (60, 70))
    assert m.shape == (60, 70) and m.dtype == np.uint8
    assert m[25, 30] == 255 and m[5, 5] == 0 and m[45, 30] == 0
    assert int((m > 0).sum()) == 41 * 31
    with pytest.raises(ValueError):
        polygon_face_mask(square[:2], (60, 70))


def test_blur_kernel_matches_official_formula():
    assert blur_kernel_size(180) == 19
    assert blur_kernel_size(256) == 25
    assert blur_kernel_size(315) == 31
    assert all(blur_kernel_size(w) % 2 == 1 for w in range(1, 800))


def test_inpainting_line_is_the_face_box_centre_on_the_official_crop():
    """Row int(crop_h * 0.5) of the official centred square is the face box's centre line."""
    for box in [(175, 80, 280, 200), (10, 11, 110, 140), (3, 7, 60, 58), (0, 1, 33, 34)]:
        crop = crop_box_for(box)
        assert crop[1] + inpainting_line(crop[3] - crop[1], 0.5) == (box[1] + box[3]) // 2
    assert inpainting_line(241, 0.5) == 120 and inpainting_line(240, 0.4) == 96


def astronaut_crop(astronaut, face_box):
    crop_box = crop_box_for(face_box)
    x0, y0, x1, y1 = crop_box
    assert x0 >= 0 and y0 >= 0 and x1 <= 512 and y1 <= 512
    return np.ascontiguousarray(astronaut[y0:y1, x0:x1]), crop_box


@pytest.mark.parametrize("mode", ["jaw", "raw"])
def test_blend_mask_limits_with_parser(skin_parser, astronaut, mode):
    crop, crop_box = astronaut_crop(astronaut, ASTRONAUT_FACE_BOX)
    box = to_crop(ASTRONAUT_FACE_BOX, crop_box)
    settings = MaskSettings(mode=mode)
    hard = blend_mask(crop, box, settings=settings, parser=skin_parser, blur=False)
    h, w = crop.shape[:2]
    assert hard.shape == (h, w) and hard.dtype == np.uint8
    line = h // 2
    x0, _, x1, y1 = box
    assert not hard[:line].any()
    assert not hard[:, :x0].any() and not hard[:, x1:].any() and not hard[y1:].any()
    assert (hard[line:y1, x0:x1] == 255).all()  # the parser sees skin everywhere

    soft = blend_mask(crop, box, settings=settings, parser=skin_parser)
    k = blur_kernel_size(w)
    assert soft.shape == (h, w) and soft.dtype == np.uint8
    assert not soft[: line - k // 2].any()
    assert not soft[:, : x0 - k // 2].any() and not soft[:, x1 + k // 2 :].any()
    assert soft[(line + y1) // 2, (x0 + x1) // 2] == 255
    assert 0 < soft[line, (x0 + x1) // 2] < 255  # the line itself is feathered


def test_blend_mask_real_parser_random_weights_stays_in_talking_area(tiny_parser, astronaut):
    crop, crop_box = astronaut_crop(astronaut, ASTRONAUT_FACE_BOX)
    box = to_crop(ASTRONAUT_FACE_BOX, crop_box)
    hard = blend_mask(crop, box, settings=MaskSettings(), parser=tiny_parser, blur=False)
    outside = np.ones_like(hard, dtype=bool)
    outside[crop.shape[0] // 2 : box[3], box[0] : box[2]] = False
    assert not hard[outside].any()


def frame_mask(astronaut, face_box, settings, parser=None):
    """Pre-blur mask pasted back into frame coordinates, crop recomputed from the box."""
    crop, crop_box = astronaut_crop(astronaut, face_box)
    box = to_crop(face_box, crop_box)
    h, w = crop.shape[:2]
    contour = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float32)
    m = blend_mask(crop, box, settings=settings, parser=parser, contour_in_crop=contour, blur=False)
    full = np.zeros(astronaut.shape[:2], np.uint8)
    full[crop_box[1] : crop_box[3], crop_box[0] : crop_box[2]] = m
    return full


@pytest.mark.parametrize("shift", [-7, -2, 3, 8])
def test_bbox_shift_moves_the_boundary_exactly(skin_parser, astronaut, shift):
    """bbox_shift moves the box centre by `shift` (top by 2*shift): so does the mask's top edge."""
    x0, y0, x1, y1 = ASTRONAUT_FACE_BOX
    for settings, parser in ((MaskSettings(mode="polygon"), None), (MaskSettings(mode="jaw"), skin_parser)):
        base = frame_mask(astronaut, ASTRONAUT_FACE_BOX, settings, parser)
        moved = frame_mask(astronaut, (x0, y0 + 2 * shift, x1, y1), settings, parser)
        top_base = int(np.flatnonzero(base.any(axis=1))[0])
        top_moved = int(np.flatnonzero(moved.any(axis=1))[0])
        assert top_base == (y0 + y1) // 2
        assert top_moved - top_base == shift
        assert np.array_equal(np.flatnonzero(base.any(axis=0)), np.flatnonzero(moved.any(axis=0)))


@pytest.mark.parametrize("d", [-5, 1, 6])
def test_the_line_follows_the_crop_height_not_a_box_moved_inside_it(astronaut, d):
    """As the official: the line is row int(crop_h * ratio) of the crop; the box only bounds it."""
    crop, crop_box = astronaut_crop(astronaut, ASTRONAUT_FACE_BOX)
    h, w = crop.shape[:2]
    contour = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float32)
    box = to_crop(ASTRONAUT_FACE_BOX, crop_box)
    moved = (box[0], box[1] + d, box[2], box[3] + d)
    s = MaskSettings(mode="polygon")
    a = blend_mask(crop, box, settings=s, contour_in_crop=contour, blur=False)
    b = blend_mask(crop, moved, settings=s, contour_in_crop=contour, blur=False)
    rows_a, rows_b = np.flatnonzero(a.any(axis=1)), np.flatnonzero(b.any(axis=1))
    assert rows_a[0] == rows_b[0] == h // 2
    assert rows_b[-1] - rows_a[-1] == d


def test_polygon_mode_needs_no_parser(astronaut):
    crop, crop_box = astronaut_crop(astronaut, ASTRONAUT_FACE_BOX)
    box = to_crop(ASTRONAUT_FACE_BOX, crop_box)
    h, w = crop.shape[:2]
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    oval = np.stack([w / 2 + 0.3 * w * np.cos(t), h / 2 + 0.4 * h * np.sin(t)], axis=1)
    settings = MaskSettings(mode="polygon")
    hard = blend_mask(crop, box, settings=settings, contour_in_crop=oval, blur=False)
    assert hard[int(h * 0.7), w // 2] == 255
    assert hard[int(h * 0.7), int(w * 0.15)] == 0  # outside the oval, inside the box rows
    assert not hard[: h // 2].any()
    soft = blend_mask(crop, box, settings=settings, contour_in_crop=oval)
    assert soft.shape == (h, w) and soft.max() == 255
    with pytest.raises(ValueError):
        blend_mask(crop, box, settings=settings)


def test_parser_modes_without_parser_raise_clear_error(astronaut):
    crop, crop_box = astronaut_crop(astronaut, ASTRONAUT_FACE_BOX)
    box = to_crop(ASTRONAUT_FACE_BOX, crop_box)
    for mode in ("jaw", "raw"):
        with pytest.raises(ConfigError, match="polygon"):
            blend_mask(crop, box, settings=MaskSettings(mode=mode))


def test_mask_settings_validation():
    with pytest.raises(ConfigError):
        MaskSettings(mode="neck")
    with pytest.raises(ConfigError):
        MaskSettings(upper_boundary_ratio=1.5)
    assert MaskSettings() == MaskSettings(mode="jaw", cheek_width=90, upper_boundary_ratio=0.5)


def test_batch_matches_single_calls(tiny_parser, astronaut):
    boxes = [ASTRONAUT_FACE_BOX, (185, 95, 275, 190), (170, 70, 290, 215)]
    crops, in_crop = [], []
    for b in boxes:
        c, cb = astronaut_crop(astronaut, b)
        crops.append(c)
        in_crop.append(to_crop(b, cb))
    assert len({c.shape for c in crops}) == 3  # different crop sizes in one batch
    settings = MaskSettings()
    batch = blend_masks_batch(crops, in_crop, settings=settings, parser=tiny_parser)
    for c, b, m in zip(crops, in_crop, batch):
        assert m.shape == c.shape[:2]
        assert np.array_equal(m, blend_mask(c, b, settings=settings, parser=tiny_parser))


def test_non_finite_weights_are_rejected(tmp_path):
    path = save_random_parser(tmp_path, base_channels=8)
    state = torch.load(path, weights_only=True)
    state["cp.arm32.conv_atten.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, path)
    with pytest.raises(MissingWeightsError, match="non-finite values in: cp.arm32.conv_atten.weight"):
        FaceParser.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- official v1.5 rules


def test_one_skin_pixel_dilates_to_exactly_the_cone():
    """Centre band: a lone skin pixel at (200, 256) becomes the 33x33 cone, seen from the pixel.

    The kernel's rows 10..20 (offsets -6..+4 from the anchor row 16) hold runs of width
    2(r-10)+1 and rows 21..32 (offsets +5..+16) runs of width 21. Dilation sets a pixel when
    skin lies at pixel + offset, so the blob spans rows 200-16 .. 200+6: 21 px wide from 16
    rows above down to 4 rows above (kernel rows 32..20), then narrowing by 2 per row to a
    single pixel 6 rows below.
    """
    lab = np.zeros((512, 512), np.uint8)
    lab[200, 256] = 1
    got = parsing_to_face_mask(lab, "jaw", cheek_width=90) > 0
    want = np.zeros((512, 512), bool)
    for d in range(-16, 7):  # row offset from the skin pixel
        width = 21 if d <= -4 else 2 * (6 - d) + 1
        want[200 + d, 256 - width // 2 : 256 + width // 2 + 1] = True
    assert np.array_equal(got, want)
    assert got.sum() == 13 * 21 + sum(2 * (6 - d) + 1 for d in range(-3, 7))  # 273 + 100


def test_cheek_band_erosion_is_a_35_wide_ellipse_twice():
    """In the cheek band the dilated skin is eroded twice by a 35x3 ellipse: 2 x 17 px per side."""
    lab = np.zeros((512, 512), np.uint8)
    lab[100:300, 20:140] = 1  # inside the left cheek band (columns <= 256 - 90)
    got = parsing_to_face_mask(lab, "jaw", cheek_width=90)
    # dilation widens the rectangle by 10 px per side (the 21-wide run) -> columns 10..149;
    # two erosions take 17 px per side each -> columns 44..115
    cols = np.flatnonzero(got[200])
    assert (cols[0], cols[-1]) == (10 + 34, 149 - 34)
    assert len(cols) == 115 - 44 + 1
    # a lone pixel there (21 px wide after dilation) vanishes entirely
    lone = np.zeros((512, 512), np.uint8)
    lone[200, 60] = 1
    assert not parsing_to_face_mask(lone, "jaw", cheek_width=90).any()


class _RecordingParser:
    """Stands in for BiSeNet: every pixel is skin; remembers what it was shown."""

    def __init__(self):
        self.seen: list[np.ndarray] = []

    def parse_512(self, batch: np.ndarray) -> np.ndarray:
        self.seen.append(batch.copy())
        return np.ones(batch.shape[:3], np.int64)


def test_crop_past_the_left_edge_is_parsed_and_blurred_as_the_whole_square():
    """Face box (0, 100, 160, 260): half side int(160 // 2 * 1.5) = 120, centre (80, 180), so
    the square is (-40, 60, 200, 300), 40 px past the frame's left edge."""
    frame = np.full((400, 400, 3), 200, np.uint8)
    box = (0, 100, 160, 260)
    parser = _RecordingParser()
    settings = MaskSettings(mode="raw")
    regions, masks = frame_blend_masks([frame], [box], settings=settings, parser=parser)
    assert regions == [(0, 60, 200, 300)]
    # the parser saw the whole 240x240 square scaled to 512, black in its left 40 columns:
    # output column j samples input (j + 0.5) * 240 / 512 - 0.5, black while that is <= 39
    seen = parser.seen[0][0]
    assert seen.shape == (512, 512, 3)
    assert seen[:, :84].max() == 0 and 0 < seen[0, 84, 0] < 200 and seen[:, 86:].min() == 200
    # before cutting: the square's mask is the face box from row int(240 * 0.5) = 120 down,
    # so its left 40 columns (outside the frame) are black; the blur kernel comes from the
    # square's width: int(0.1 * 240 // 2 * 2) + 1 = 25
    hard = blend_masks_batch(
        [cut_square(frame, square_crop_box(box))], [(40, 40, 200, 200)], settings=settings, parser=parser, blur=False
    )[0]
    want = np.zeros((240, 240), np.uint8)
    want[120:200, 40:200] = 255
    assert np.array_equal(hard, want) and not hard[:, :40].any()
    assert blur_kernel_size(240) == 25
    blurred = cv2.GaussianBlur(want, (25, 25), 0)
    assert np.array_equal(masks[0], blurred[:, 40:])  # the in-frame part, columns 40.. of the square
    # the frame's left edge is feathered (black lay beyond it), not solid as a crop cut at the
    # edge and blurred with mirrored borders would be
    assert 0 < masks[0][160, 0] < 200


def test_parsing_mask_goes_back_to_crop_size_bicubically():
    """The official resizes the 512x512 mask back with PIL's default for 'L' images, bicubic."""
    from PIL import Image

    from musetalk.face.mask import _resize_back

    step = np.zeros((512, 512), np.uint8)
    step[:, 256:] = 255
    cubic = _resize_back(step, 240, 240)
    linear = np.asarray(Image.fromarray(step).resize((240, 240), Image.BILINEAR))
    assert np.array_equal(cubic, np.asarray(Image.fromarray(step).resize((240, 240), Image.BICUBIC)))
    assert not np.array_equal(cubic, linear)
