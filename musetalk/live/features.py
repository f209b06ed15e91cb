"""Whisper features for live audio windows, several windows (sessions) in one encoder pass.

`WindowEncoder(models, window_seconds=30)` runs MuseTalk's recipe: each window is padded to
30 s, log-mel, the whisper encoder, 5 hidden states per 20 ms row; with one window per call
its features equal `FeatureRequest.compute` bit for bit. A shorter `window_seconds` feeds the
encoder only that much audio (the newest part of each window) and the first positions of its
positional table: the cost falls with the length (the 30 s pass is mostly padding), the
features are no longer the 30 s recipe's, so lip shapes may differ; opt-in.

Per session the service keeps a `FeatureCache` (the newest window of its utterance, the last
encoding); `batch_features` gives every frame of a batch its `(50, D)` window, reusing a
session's encoding wherever it covers the frame and encoding the rest in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from loguru import logger

from musetalk.audio import (
    FEATURES_PER_VIDEO_FRAME,
    LEFT_PAD_FEATURES,
    NUM_HIDDEN_STATES,
    SAMPLES_PER_FEATURE,
    WINDOW_SECONDS,
    windows_from_features,
)
from musetalk.config import AUDIO_SAMPLE_RATE
from musetalk.live.requests import FrameRequest
from musetalk.models import Models

HOP_SAMPLES = 160  # whisper log-mel hop: 100 mel frames per second


class WindowEncoder:
    """Encodes live audio windows; not thread-safe (the service calls it from its worker)."""

    def __init__(self, models: Models, *, window_seconds: float = WINDOW_SECONDS):
        if not 1.0 <= window_seconds <= WINDOW_SECONDS:
            raise ValueError(f"window_seconds must be between 1 and {WINDOW_SECONDS}")
        self.models = models
        self.samples = int(window_seconds * AUDIO_SAMPLE_RATE) // SAMPLES_PER_FEATURE * SAMPLES_PER_FEATURE
        self.window_seconds = self.samples / AUDIO_SAMPLE_RATE

    def trim(self, window: np.ndarray, first_feature: int) -> tuple[np.ndarray, int]:
        """Keep the newest `window_seconds` of a window (whole 20 ms rows): `(audio, first_feature)`."""
        extra = len(window) - self.samples
        if extra <= 0:
            return window, first_feature
        drop = -(-extra // SAMPLES_PER_FEATURE) * SAMPLES_PER_FEATURE
        return window[drop:], first_feature + drop // SAMPLES_PER_FEATURE

    @torch.inference_mode()
    def encode(self, windows: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Windows of `<= samples` float32 16 kHz audio -> per window `(len // 320, 5, D) float32` on CPU."""
        if not windows:
            return []
        for w in windows:
            if len(w) > self.samples:
                raise ValueError(f"a window holds {len(w)} samples; this encoder takes at most {self.samples}")
        m = self.models
        mel = m.feature_extractor(
            [np.asarray(w, dtype=np.float32) for w in windows], sampling_rate=AUDIO_SAMPLE_RATE,
            return_tensors="pt", padding="max_length", max_length=self.samples,
        ).input_features  # (B, 80, samples / 160)  # fmt: skip
        states = self._hidden_states(mel.to(m.device, m.dtype))  # (B, rows, 5, D)
        states = states.float().cpu()
        return [states[k, : len(w) // SAMPLES_PER_FEATURE] for k, w in enumerate(windows)]

    def _hidden_states(self, mel: torch.Tensor) -> torch.Tensor:
        """Whisper's encoder forward on `mel (B, 80, T)`, with the positional table cut to T / 2 rows.

        The same operations as `WhisperEncoder.forward` (embeddings, each layer's output, the last
        one after the final LayerNorm), which insists on T = 3000.
        """
        enc = self.models.whisper
        x = F.gelu(enc.conv1(mel))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        hidden = x + enc.embed_positions.weight[: x.shape[1]]
        states = [hidden]
        for layer in enc.layers:
            hidden = layer(hidden, None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            states.append(hidden)
        states[-1] = enc.layer_norm(hidden)
        if len(states) != NUM_HIDDEN_STATES:
            raise ValueError(f"whisper encoder gave {len(states)} hidden states; MuseTalk needs 5 (4 layers)")
        return torch.stack(states, dim=2)


# ----------------------------------------------------------------------------- per session, per batch
Encoding = tuple[torch.Tensor, int]  # (feature rows, global index of the first row)


@dataclass
class FeatureCache:
    """One session's audio for the encoder: the newest window of its utterance and its last encoding."""

    newest: dict[int, FrameRequest] = field(default_factory=dict)  # utterance -> newest window request
    encoded: dict[int, Encoding] = field(default_factory=dict)  # utterance -> last encoding (kept across batches)

    def offer(self, request: FrameRequest) -> None:
        """A submitted request: its window becomes the newest when it reaches at least as far."""
        if request.window is None:
            return
        newest = self.newest.get(request.utterance)
        if newest is None or _end_sample(newest) <= _end_sample(request):
            self.newest = {request.utterance: request}  # older utterances keep their own windows

    def clear(self) -> None:
        """An interruption: nothing of the cut-off speech is reused."""
        self.newest.clear()
        self.encoded.clear()


@dataclass(frozen=True)
class FeatureRow:
    """One frame of a batch, as the feature step sees it."""

    session_id: str  # where a failure is reported
    cache: FeatureCache  # the frame's session's
    request: FrameRequest
    index: int  # the frame's place in `request.items` (and `request.features`)


def batch_features(
    encoder: WindowEncoder, rows: Sequence[FeatureRow]
) -> tuple[list[torch.Tensor | None], dict[str, str]]:
    """`(50, D)` per frame (None where its audio could not be encoded) and {session id: why} for those.

    Per session, one encoding serves every frame it covers: the last one (kept across batches)
    if it does, else the newest window is encoded; all windows of the batch go through whisper
    in one pass.
    """
    plans: list[int | torch.Tensor] = []  # per row: the key of its encoding, or ready features
    windows: dict[int, tuple[np.ndarray, int, str]] = {}  # key -> trimmed window, its first row, session id
    owners: dict[int, tuple[FeatureCache, int]] = {}  # key -> cache, utterance (to keep the encoding)
    reused: dict[int, Encoding] = {}  # key -> an encoding from an earlier batch
    for row in rows:
        request, cache = row.request, row.cache
        if request.features is not None:
            plans.append(torch.as_tensor(request.features[row.index]))
            continue
        frame = request.items[row.index].frame
        cached = cache.encoded.get(request.utterance)
        if cached is not None and _covers(cached[1], cached[1] + len(cached[0]), frame, request):
            reused[-id(cached)] = cached
            plans.append(-id(cached))
            continue
        source = request
        newest = cache.newest.get(request.utterance)
        if newest is not None and newest is not request:
            audio, first = encoder.trim(newest.window, newest.first_feature)
            if _covers(first, first + len(audio) // SAMPLES_PER_FEATURE, frame, request):
                source = newest  # a later snapshot of the same utterance covers this frame
        if id(source) not in windows:
            audio, first = encoder.trim(source.window, source.first_feature)
            windows[id(source)] = (audio, first, row.session_id)
            owners[id(source)] = (cache, request.utterance)
        plans.append(id(source))
    encoded, failed = _encode(encoder, windows)
    for key, (cache, utterance) in owners.items():
        if key in encoded:
            cache.encoded = {utterance: encoded[key]}
    encoded.update(reused)
    features: list[torch.Tensor | None] = []
    for row, plan in zip(rows, plans):
        if isinstance(plan, torch.Tensor):
            features.append(plan)
        elif plan in encoded:
            feats, first = encoded[plan]
            features.append(windows_from_features(feats, first, [row.request.items[row.index].frame])[0])
        else:
            features.append(None)
    return features, failed


def _end_sample(request: FrameRequest) -> int:
    """Where the request's window ends, in samples since the stream began."""
    return request.first_feature * SAMPLES_PER_FEATURE + len(request.window)


def _covers(first_row: int, end_row: int, frame: int, request: FrameRequest) -> bool:
    """Whether feature rows `[first_row, end_row)` hold frame `frame`'s window as its own request would."""
    own_end = request.first_feature + len(request.window) // SAMPLES_PER_FEATURE
    lo = 2 * frame - LEFT_PAD_FEATURES
    return (first_row <= max(lo, 0) or first_row == 0) and end_row >= min(lo + FEATURES_PER_VIDEO_FRAME, own_end)


def _encode(
    encoder: WindowEncoder, windows: dict[int, tuple[np.ndarray, int, str]]
) -> tuple[dict[int, Encoding], dict[str, str]]:
    """One whisper pass for all windows; if it fails, window by window so only the bad session loses."""
    keys = list(windows)
    try:
        out = encoder.encode([windows[k][0] for k in keys])
        return {k: (f, windows[k][1]) for k, f in zip(keys, out)}, {}
    except Exception:
        if len(keys) == 1:
            logger.exception("MuseTalk audio features failed for session {}", windows[keys[0]][2])
            return {}, {windows[keys[0]][2]: "the audio window could not be encoded"}
    encoded: dict[int, Encoding] = {}
    failed: dict[str, str] = {}
    for k in keys:
        one, bad = _encode(encoder, {k: windows[k]})
        encoded.update(one)
        failed.update(bad)
    return encoded, failed
