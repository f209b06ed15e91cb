"""Whisper-tiny audio features, per video frame, for files and for live audio.

File path (`AudioFeatureEncoder.frame_features`): exactly MuseTalk's recipe. Audio is cut
into 30 s windows, each padded to 30 s and run through the encoder; the 5 hidden states
(embeddings, layers 1-3, final after LayerNorm) are stacked to `(T, 5, D)` at 50 feature
frames per second, padded with 4 zero frames on the left and 12 on the right, and video
frame `i` takes feature frames `[2i, 2i + 10)` of the padded sequence -> `(50, D)`.

Live path (`StreamingAudioFeatures` + `FeatureRequest`): the same encoder on a rolling
window that ends at the newest audio (up to `context_seconds` of history, padded to 30 s
like the file path), one encoder pass per batch of frames.
Frame `i` covers samples `[640 i, 640 i + 640)`; its last feature frame `2i + 5` reaches
through the encoder's two convolutions and the 25 ms mel window to sample `640 i + 2120`,
so a frame is ready `LOOKAHEAD_MS` = 132.5 ms after its first sample arrives (92.5 ms
after its last). Features differ from the file path only because the encoder cannot see
audio that has not arrived yet; `tests/test_audio.py` measures that difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from musetalk.config import AUDIO_SAMPLE_RATE, SAMPLES_PER_VIDEO_FRAME

FEATURES_PER_SECOND = 50
SAMPLES_PER_FEATURE = AUDIO_SAMPLE_RATE // FEATURES_PER_SECOND  # 320
WINDOW_SECONDS = 30
WINDOW_SAMPLES = WINDOW_SECONDS * AUDIO_SAMPLE_RATE
NUM_HIDDEN_STATES = 5
FEATURES_PER_VIDEO_FRAME = 10  # -> 10 x 5 = 50 tokens per frame
LEFT_PAD_FEATURES = 4
RIGHT_PAD_FEATURES = 12
# Feature row j sees mel frames 2j-2..2j+2 (two k=3 convolutions, the second with stride 2);
# mel frame m spans samples [160 m - 200, 160 m + 200). Row 2i+5 therefore ends at 640 i + 2120.
LOOKAHEAD_SAMPLES = 2120
LOOKAHEAD_MS = LOOKAHEAD_SAMPLES * 1000 / AUDIO_SAMPLE_RATE


def frame_count_for(num_samples: int) -> int:
    """Video frames needed to cover the audio (the last partial 40 ms gets a frame too)."""
    return max(1, math.ceil(num_samples / SAMPLES_PER_VIDEO_FRAME))


def positional_encoding(length: int, dim: int) -> torch.Tensor:
    """Sinusoidal encoding MuseTalk adds over the 50 audio tokens: `(1, length, dim) float32`."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe.unsqueeze(0)


class AudioFeatureEncoder:
    """Runs the whisper encoder on 30 s windows (the file path: render, previews, `generate_video_frame`).

    The live path batches its sessions' windows through `musetalk.live.features.WindowEncoder` instead."""

    def __init__(self, whisper, feature_extractor, device: torch.device, dtype: torch.dtype):
        self.whisper = whisper
        self.feature_extractor = feature_extractor
        self.device = device
        self.dtype = dtype
        self.dim = int(whisper.config.d_model)

    @torch.inference_mode()
    def encode_window(self, audio: np.ndarray) -> torch.Tensor:
        """`(n <= 480000,) float32` 16 kHz audio -> `(1500, 5, D) float32` on CPU (padded to 30 s)."""
        if audio.shape[0] > WINDOW_SAMPLES:
            raise ValueError("encode_window takes at most 30 s of audio")
        mel = self.feature_extractor(
            audio, sampling_rate=AUDIO_SAMPLE_RATE, return_tensors="pt"
        ).input_features  # (1, 80, 3000)
        out = self.whisper(mel.to(self.device, self.dtype), output_hidden_states=True)
        states = torch.stack(out.hidden_states, dim=2)  # (1, 1500, 5, D)
        if states.shape[2] != NUM_HIDDEN_STATES:
            raise ValueError(f"whisper encoder gave {states.shape[2]} hidden states; MuseTalk needs 5 (4 layers)")
        return states[0].float().cpu()

    def encode(self, audio: np.ndarray) -> torch.Tensor:
        """Whole clip -> `(floor(n / 320), 5, D) float32`, one row per 20 ms."""
        pieces = [
            self.encode_window(audio[s : s + WINDOW_SAMPLES]) for s in range(0, max(len(audio), 1), WINDOW_SAMPLES)
        ]
        feats = torch.cat(pieces, dim=0)
        return feats[: len(audio) // SAMPLES_PER_FEATURE]

    def frame_features(self, audio: np.ndarray, num_frames: int | None = None) -> torch.Tensor:
        """File path: audio -> `(num_frames, 50, D) float32` windows, one per 40 ms video frame."""
        num_frames = frame_count_for(len(audio)) if num_frames is None else num_frames
        return windows_from_features(self.encode(audio), 0, num_frames)


def windows_from_features(feats: torch.Tensor, first_feature: int, frame_indices: Sequence[int] | int) -> torch.Tensor:
    """Cut per-frame windows out of features whose row 0 is global feature `first_feature`.

    Rows outside the available range are zeros, which reproduces MuseTalk's 4-left /
    12-right zero padding at the clip edges. Returns `(len(frames), 50, D)`.
    """
    frames = range(frame_indices) if isinstance(frame_indices, int) else frame_indices
    n, layers, dim = feats.shape
    out = torch.zeros(len(frames), FEATURES_PER_VIDEO_FRAME, layers, dim, dtype=feats.dtype)
    for k, i in enumerate(frames):
        start = 2 * i - LEFT_PAD_FEATURES - first_feature
        lo, hi = max(start, 0), min(start + FEATURES_PER_VIDEO_FRAME, n)
        if hi > lo:
            out[k, lo - start : hi - start] = feats[lo:hi]
    return out.reshape(len(frames), FEATURES_PER_VIDEO_FRAME * layers, dim)


@dataclass(frozen=True)
class ReadyFrame:
    """A video frame whose audio (and look-ahead) has fully arrived."""

    index: int  # frame number since the stream (utterance) started
    pcm: np.ndarray  # (640,) float32, this frame's own 40 ms of audio


@dataclass(frozen=True)
class FeatureRequest:
    """Everything needed to compute some frames' features later, in another thread.

    `window` is a copy of the audio the encoder will see (it ends at the newest sample
    received when the request was made); `first_feature` is its global feature row.
    """

    window: np.ndarray
    first_feature: int
    frames: tuple[int, ...]

    def compute(self, encoder: AudioFeatureEncoder) -> torch.Tensor:
        """-> `(len(frames), 50, D) float32`; one encoder pass for all the frames."""
        feats = encoder.encode_window(self.window)
        # Like the file path, keep only whole 20 ms rows of real audio; beyond them is zero padding.
        feats = feats[: len(self.window) // SAMPLES_PER_FEATURE]
        return windows_from_features(feats, self.first_feature, self.frames)


class StreamingAudioFeatures:
    """Live audio bookkeeping: which frames are ready, their audio, and feature requests.

    Cheap (no model work), so it runs on the event loop; the encoder runs later on a
    `FeatureRequest` in the worker thread, once per batch. Frame `i` is ready
    `LOOKAHEAD_MS` after its first sample arrived. `reset()` drops everything at once
    (interruptions); `flush()` releases the tail of an utterance, whose missing
    look-ahead is zero padding exactly as in the file path. Not thread-safe.
    """

    def __init__(self, *, context_seconds: float = 20.0):
        if not 1.0 <= context_seconds <= WINDOW_SECONDS - 1:
            raise ValueError("context_seconds must be between 1 and 29")
        self.context_samples = int(context_seconds * AUDIO_SAMPLE_RATE) // SAMPLES_PER_FEATURE * SAMPLES_PER_FEATURE
        self.reset()

    def reset(self) -> None:
        # Audio lives in one preallocated buffer, valid between _lo and _hi: appending a 20 ms chunk
        # copies 20 ms, not the whole context (as concatenating would, 50 times a second per session).
        self._buf = np.zeros(self.context_samples + 4 * AUDIO_SAMPLE_RATE, dtype=np.float32)
        self._lo = self._hi = 0
        self._audio_start = 0  # global sample index of self._audio[0]; a multiple of 320
        self._next_frame = 0

    @property
    def _audio(self) -> np.ndarray:
        return self._buf[self._lo : self._hi]

    @property
    def total_samples(self) -> int:
        return self._audio_start + (self._hi - self._lo)

    @property
    def next_frame(self) -> int:
        return self._next_frame

    def push(self, pcm: np.ndarray) -> list[ReadyFrame]:
        """Append 16 kHz mono float32 audio; return the frames whose look-ahead is now complete."""
        self._append(np.asarray(pcm, dtype=np.float32).reshape(-1))
        last_ready = (self.total_samples - LOOKAHEAD_SAMPLES) // SAMPLES_PER_VIDEO_FRAME
        return self._release(range(self._next_frame, last_ready + 1))

    def _append(self, pcm: np.ndarray) -> None:
        if self._hi + len(pcm) > len(self._buf):
            kept = self._hi - self._lo
            if kept + len(pcm) > len(self._buf):  # frames held back longer than the context: grow
                grown = np.zeros(max(2 * len(self._buf), kept + len(pcm)), dtype=np.float32)
                grown[:kept] = self._buf[self._lo : self._hi]
                self._buf = grown
            else:
                self._buf[:kept] = self._buf[self._lo : self._hi]
            self._lo, self._hi = 0, kept
        self._buf[self._hi : self._hi + len(pcm)] = pcm
        self._hi += len(pcm)

    def flush(self) -> list[ReadyFrame]:
        """End of utterance: release every remaining frame (request their features before `reset()`)."""
        total = self.total_samples
        return self._release(range(self._next_frame, frame_count_for(total) if total else 0))

    def request(self, frames: Sequence[int]) -> FeatureRequest:
        """Snapshot for computing `frames`' features with everything heard so far as context."""
        total = self.total_samples
        window_start = max(self._audio_start, total - self.context_samples)
        window_start -= (window_start - self._audio_start) % SAMPLES_PER_FEATURE
        window = self._audio[window_start - self._audio_start :].copy()
        return FeatureRequest(window, window_start // SAMPLES_PER_FEATURE, tuple(frames))

    def _release(self, frames: range) -> list[ReadyFrame]:
        ready = []
        for i in frames:
            a = i * SAMPLES_PER_VIDEO_FRAME - self._audio_start
            pcm = self._audio[max(a, 0) : a + SAMPLES_PER_VIDEO_FRAME].copy()  # the buffer is reused
            if len(pcm) < SAMPLES_PER_VIDEO_FRAME:
                pcm = np.pad(pcm, (0, SAMPLES_PER_VIDEO_FRAME - len(pcm)))
            ready.append(ReadyFrame(index=i, pcm=pcm))
        if len(frames):
            self._next_frame = frames.stop
        self._trim()
        return ready

    def _trim(self) -> None:
        """Keep only the history a window can use (and the frames not yet released)."""
        keep_from = self.total_samples - self.context_samples - SAMPLES_PER_VIDEO_FRAME
        keep_from = min(keep_from, self._next_frame * SAMPLES_PER_VIDEO_FRAME)
        drop = (keep_from - self._audio_start) // SAMPLES_PER_FEATURE * SAMPLES_PER_FEATURE
        if drop > 0:
            self._lo += drop
            self._audio_start += drop
