"""Preview before preparation: frames spread over the clip, boxes, mask line, generated frame."""

from __future__ import annotations

import media
import numpy as np
import pytest

from musetalk.avatar.preview import PreviewCache, preview_video, spread
from musetalk.config import PrepareSettings
from musetalk.errors import NoFaceError
from musetalk.media import read_video


def test_spread():
    assert spread(100, 4) == [0, 33, 66, 99]
    assert spread(3, 4) == [0, 1, 2]


def test_preview_four_frames_and_bbox_shift(models, face_video):
    frames, _ = read_video(face_video)
    cache = PreviewCache()
    base = preview_video(models, face_video, PrepareSettings(bbox_shift=0), cache=cache)
    analysed = cache.last
    moved = preview_video(models, face_video, PrepareSettings(bbox_shift=5), cache=cache)
    assert analysed is not None and cache.last is analysed  # slider changes reuse the decoded clip
    assert [f.index for f in base.frames] == [0, 16, 33, 49]
    lo, hi = base.shift_range
    assert lo < 0 < hi and base.mask_mode == "jaw"
    for a, b in zip(base.frames, moved.frames):
        assert a.annotated.shape == a.generated.shape == (512, 512, 3)
        assert a.side_by_side().shape == (512, 1024, 3)
        assert b.mask_line - a.mask_line == 5  # the drawn mask line follows bbox_shift exactly
        x0, y0, x1, y1 = a.box
        # the line is drawn in red across the box at the mask line
        row = a.annotated[a.mask_line, x0 + 2 : x1 - 2]
        assert (row[:, 0] > 200).mean() > 0.9 and (row[:, 1] < 80).mean() > 0.9
        # the generated frame is the original outside the face box and model output in its lower half
        original = frames[a.index]
        outside = np.ones(original.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(a.generated[outside], original[outside])
        assert not np.array_equal(a.generated[a.mask_line + 10 : y1, x0:x1], original[a.mask_line + 10 : y1, x0:x1])


def test_preview_refuses_a_video_without_face(models, tmp_path):
    video = media.still_video(tmp_path / "cat.mp4", "chelsea", seconds=0.4)
    with pytest.raises(NoFaceError):
        preview_video(models, video)
