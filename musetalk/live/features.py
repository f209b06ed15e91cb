"""Whisper features for live audio windows, several windows (sessions) in one encoder pass.

`WindowEncoder(models, window_seconds=30)` runs MuseTalk's recipe: each window is padded to
30 s, log-mel, the whisper encoder, 5 hidden states per 20 ms row; with one window per call
its features equal `FeatureRequest.compute` bit for bit. A shorter `window_seconds` feeds the
encoder only that much audio (the newest part of each window) and the first positions of its
positional table: the cost falls with the length (the 30 s pass is mostly padding), the
features are no longer the 30 s recipe's, so lip shapes may differ; opt-in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from musetalk.audio import NUM_HIDDEN_STATES, SAMPLES_PER_FEATURE, WINDOW_SECONDS
from musetalk.config import AUDIO_SAMPLE_RATE
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
