"""Whisper-tiny audio features, per video frame, for files and for live audio.

File path (`AudioFeatureEncoder.frame_features`): exactly MuseTalk's recipe. Audio is cut
into 30 s windows, each padded to 30 s and run through the encoder; the 5 hidden states
(embeddings, layers 1-3, final after LayerNorm) are stacked to `(T, 5, D)` at 50 feature
frames per second, padded with 4 zero frames on the left and 12 on the right, and video
frame `i` takes feature frames `[2i, 2i + 10)` of the padded sequence -> `(50, D)`.

Live path (`StreamingAudioFeatures`): the same encoder on a rolling window that ends at
the newest audio (up to `context_seconds` of history, padded to 30 s like the file path).
Frame `i` covers samples `[640 i, 640 i + 640)`; its last feature frame `2i + 5` reaches
through the encoder's two convolutions and the 25 ms mel window to sample `640 i + 2120`,
so a frame is ready `LOOKAHEAD_MS` = 132.5 ms after its first sample arrives (92.5 ms
after its last). Features differ from the file path only because the encoder cannot see
audio that has not arrived yet; `tests/test_audio.py` measures that difference.
"""

from __future__ import annotations

import math
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
    """Runs the whisper encoder on 30 s windows; shared by the file and live paths."""

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
        pieces = [self.encode_window(audio[s : s + WINDOW_SAMPLES]) for s in range(0, max(len(audio), 1), WINDOW_SAMPLES)]
        feats = torch.cat(pieces, dim=0)
        return feats[: len(audio) // SAMPLES_PER_FEATURE]

    def frame_features(self, audio: np.ndarray, num_frames: int | None = None) -> torch.Tensor:
        """File path: audio -> `(num_frames, 50, D) float32` windows, one per 40 ms video frame."""
        num_frames = frame_count_for(len(audio)) if num_frames is None else num_frames
        return windows_from_features(self.encode(audio), 0, num_frames)


def windows_from_features(feats: torch.Tensor, first_feature: int, frame_indices: range | int) -> torch.Tensor:
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
    """One video frame's worth of live audio and its feature window."""

    index: int  # frame number since the stream (utterance) started
    features: torch.Tensor  # (50, D) float32
    pcm: np.ndarray  # (640,) float32, this frame's own 40 ms of audio


class StreamingAudioFeatures:
    """Live audio in, per-frame feature windows out, with `LOOKAHEAD_MS` of look-ahead.

    Not thread-safe: one producer feeds it (the bot's worker thread). `reset()` drops
    everything at once (interruptions); `flush()` ends an utterance, padding its tail
    with zeros exactly as the file path does.
    """

    def __init__(self, encoder: AudioFeatureEncoder, *, context_seconds: float = 20.0):
        if not 1.0 <= context_seconds <= WINDOW_SECONDS - 1:
            raise ValueError("context_seconds must be between 1 and 29")
        self.encoder = encoder
        self.context_samples = int(context_seconds * AUDIO_SAMPLE_RATE) // SAMPLES_PER_FEATURE * SAMPLES_PER_FEATURE
        self.reset()

    def reset(self) -> None:
        self._audio = np.zeros(0, dtype=np.float32)
        self._audio_start = 0  # global sample index of self._audio[0]; a multiple of 320
        self._next_frame = 0

    @property
    def pending_samples(self) -> int:
        return self._audio_start + len(self._audio) - self._next_frame * SAMPLES_PER_VIDEO_FRAME

    def push(self, pcm: np.ndarray) -> list[ReadyFrame]:
        """Append 16 kHz mono float32 audio; return the frames whose look-ahead is now complete."""
        self._audio = np.concatenate([self._audio, np.asarray(pcm, dtype=np.float32).reshape(-1)])
        total = self._audio_start + len(self._audio)
        last_ready = (total - LOOKAHEAD_SAMPLES) // SAMPLES_PER_VIDEO_FRAME  # frames 0..last_ready are ready
        return self._emit(range(self._next_frame, last_ready + 1), total)

    def flush(self) -> list[ReadyFrame]:
        """End of utterance: emit every remaining frame (zero features past the end), then reset."""
        total = self._audio_start + len(self._audio)
        frames = self._emit(range(self._next_frame, frame_count_for(total) if total else 0), total)
        self.reset()
        return frames

    def _emit(self, frames: range, total: int) -> list[ReadyFrame]:
        if len(frames) == 0:
            return []
        window_start = max(self._audio_start, total - self.context_samples)
        window_start -= (window_start - self._audio_start) % SAMPLES_PER_FEATURE
        window = self._audio[window_start - self._audio_start : total - self._audio_start]
        feats = self.encoder.encode_window(window)
        first_feature = window_start // SAMPLES_PER_FEATURE
        # Like the file path, keep only whole 20 ms rows of real audio; beyond them is zero padding.
        feats = feats[: len(window) // SAMPLES_PER_FEATURE]
        windows = windows_from_features(feats, first_feature, frames)
        ready = []
        for k, i in enumerate(frames):
            a = i * SAMPLES_PER_VIDEO_FRAME - self._audio_start
            pcm = self._audio[max(a, 0) : a + SAMPLES_PER_VIDEO_FRAME]
            if len(pcm) < SAMPLES_PER_VIDEO_FRAME:
                pcm = np.pad(pcm, (0, SAMPLES_PER_VIDEO_FRAME - len(pcm)))
            ready.append(ReadyFrame(index=i, features=windows[k], pcm=pcm))
        self._next_frame = frames.stop
        self._trim()
        return ready

    def _trim(self) -> None:
        """Keep only the history the next window can use."""
        keep_from = self._audio_start + len(self._audio) - self.context_samples - SAMPLES_PER_VIDEO_FRAME
        keep_from = min(keep_from, self._next_frame * SAMPLES_PER_VIDEO_FRAME)
        drop = (keep_from - self._audio_start) // SAMPLES_PER_FEATURE * SAMPLES_PER_FEATURE
        if drop > 0:
            self._audio = self._audio[drop:]
            self._audio_start += drop
