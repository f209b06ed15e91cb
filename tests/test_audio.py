"""Audio features: the official 30 s file path and the streaming variant, on real speech."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from musetalk.audio import (
    LOOKAHEAD_MS,
    LOOKAHEAD_SAMPLES,
    AudioFeatureEncoder,
    StreamingAudioFeatures,
    frame_count_for,
    positional_encoding,
)
from musetalk.media import load_audio


@pytest.fixture(scope="module")
def encoder(models):
    return AudioFeatureEncoder(models.whisper, models.feature_extractor, models.device, models.dtype)


@pytest.fixture(scope="module")
def speech_audio(speech):
    return load_audio(speech)


def official_windows(encoder: AudioFeatureEncoder, audio: np.ndarray, num_frames: int) -> torch.Tensor:
    """MuseTalk's recipe written out literally: concat 30 s windows, trim, pad 4/12, slice [2i, 2i+10)."""
    feats = torch.cat([encoder.encode_window(audio[s : s + 480000]) for s in range(0, len(audio), 480000)])
    feats = feats[: math.floor(len(audio) / 16000 * 50)]
    d = feats.shape[-1]
    padded = torch.cat([torch.zeros(4, 5, d), feats, torch.zeros(12, 5, d)])
    return torch.stack([padded[2 * i : 2 * i + 10].reshape(50, d) for i in range(num_frames)])


def test_file_features_shape_and_recipe(encoder, speech_audio):
    frames = frame_count_for(len(speech_audio))
    feats = encoder.frame_features(speech_audio)
    assert feats.shape == (frames, 50, encoder.dim)
    assert frames == math.ceil(len(speech_audio) / 640)
    # frame 0 sees 4 zero feature rows (80 ms) before the clip: its first 20 tokens are zeros
    assert torch.count_nonzero(feats[0, :20]) == 0
    assert torch.count_nonzero(feats[0, 20:]) > 0
    torch.testing.assert_close(feats, official_windows(encoder, speech_audio, frames), rtol=0, atol=0)


def test_long_audio_uses_several_30s_windows(encoder):
    audio = (np.random.default_rng(0).standard_normal(16000 * 31) * 0.05).astype(np.float32)
    feats = encoder.frame_features(audio)
    assert feats.shape[0] == 31 * 25
    torch.testing.assert_close(feats, official_windows(encoder, audio, 31 * 25), rtol=0, atol=0)


def test_positional_encoding_values():
    pe = positional_encoding(50, 384)
    assert pe.shape == (1, 50, 384)
    assert pe[0, 0, 0] == 0 and pe[0, 0, 1] == 1  # sin(0), cos(0)
    assert torch.isclose(pe[0, 3, 0], torch.tensor(math.sin(3.0)))
    assert torch.isclose(pe[0, 3, 3], torch.tensor(math.cos(3.0 * 10000 ** (-2 / 384))))


def test_streaming_lookahead_is_exact():
    stream = StreamingAudioFeatures()
    assert LOOKAHEAD_SAMPLES == 2120 and LOOKAHEAD_MS == 132.5
    audio = np.zeros(640 * 3 + LOOKAHEAD_SAMPLES, dtype=np.float32)
    ready = stream.push(audio[:-1])
    assert [f.index for f in ready] == [0, 1, 2]  # frame 3 needs one more sample
    ready = stream.push(audio[-1:])
    assert [f.index for f in ready] == [3]


def test_streaming_matches_file_path_layout_and_measures_difference(encoder, speech_audio):
    """Push 20 ms chunks as a transport would; compare with the file path frame by frame."""
    stream = StreamingAudioFeatures()
    out, feats = [], []
    for start in range(0, len(speech_audio), 320):
        ready = stream.push(speech_audio[start : start + 320])
        if ready:  # like the bot: one encoder pass per batch of ready frames
            feats.append(stream.request([f.index for f in ready]).compute(encoder))
        out += ready
    streamed_before_flush = len(out)
    tail = stream.flush()
    feats.append(stream.request([f.index for f in tail]).compute(encoder))
    out += tail
    file_feats = encoder.frame_features(speech_audio)
    assert [f.index for f in out] == list(range(file_feats.shape[0]))
    assert streamed_before_flush >= file_feats.shape[0] - 4  # only the look-ahead tail waits for the flush
    for f in out:  # each frame carries exactly its own 40 ms of audio
        expected = speech_audio[f.index * 640 : f.index * 640 + 640]
        np.testing.assert_array_equal(f.pcm[: len(expected)], expected)
    live = torch.cat(feats)
    err = (live - file_feats).norm(dim=(1, 2)) / file_feats.norm(dim=(1, 2)).clamp_min(1e-6)
    cos = torch.nn.functional.cosine_similarity(live.flatten(1), file_feats.flatten(1), dim=1)
    print(
        f"\nstreaming vs file features over {len(out)} frames: relative L2 error median {err.median():.3f} "
        f"max {err.max():.3f}; cosine median {cos.median():.4f} min {cos.min():.4f}"
    )
    # Zero padding rows agree exactly; the rest is close but not equal (the encoder cannot see the future).
    assert torch.count_nonzero(live[0, :20]) == 0
    assert cos.median() > 0.9
    assert torch.isfinite(live).all()


def test_streaming_batches_share_one_encoder_pass(encoder, speech_audio):
    stream = StreamingAudioFeatures()
    ready = stream.push(speech_audio[:32000])
    request = stream.request([f.index for f in ready])
    batch = request.compute(encoder)
    assert batch.shape == (len(ready), 50, encoder.dim)
    one = stream.request([ready[7].index]).compute(encoder)
    torch.testing.assert_close(one[0], batch[7], rtol=0, atol=0)  # same window -> same features


def test_streaming_reset_drops_everything(speech_audio):
    stream = StreamingAudioFeatures()
    stream.push(speech_audio[:16000])
    stream.reset()
    assert stream.total_samples == 0 and stream.next_frame == 0
    assert stream.flush() == []
    ready = stream.push(np.zeros(640 + LOOKAHEAD_SAMPLES, dtype=np.float32))
    assert ready[0].index == 0  # a new utterance starts at frame 0 again


def test_audio_inputs_any_format(media_dir):
    import media

    mono16 = load_audio(media.speech_wav(media_dir / "a16.wav", "one two three"))
    stereo48 = load_audio(media.speech_wav(media_dir / "a48.wav", "one two three", rate=48000, stereo=True))
    m4a = load_audio(media.audio_only_file(media_dir / "a.m4a", "one two three"))
    assert mono16.dtype == np.float32 and stereo48.dtype == np.float32
    assert abs(len(stereo48) - len(mono16)) <= 160  # same speech, resampled to 16 kHz mono
    assert abs(len(m4a) - len(mono16)) < 16000 * 0.1  # AAC adds a little padding
    silent = load_audio(media.silence_wav(media_dir / "silent.wav", 1.0, rate=48000))
    assert len(silent) == 16000 and np.count_nonzero(silent) == 0


def test_stereo_is_the_mean_of_the_channels_then_16k(tmp_path):
    """As librosa (the official loader): float samples, mean of the channels, then soxr to 16 kHz.

    Left 0.6 sin(440 Hz), right 0.2 sin(1000 Hz) at 44.1 kHz -> 0.3 sin(440) + 0.1 sin(1000) at
    16 kHz. A downmix that sums with -3 dB gains (0.707 each) would be 41% louder.
    """
    import subprocess

    import imageio_ffmpeg
    import soundfile as sf

    rate = 44100
    t = np.arange(2 * rate) / rate
    left, right = 0.6 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 1000 * t)
    wav = tmp_path / "stereo.wav"
    sf.write(wav, np.stack([left, right], axis=1).astype(np.float32), rate, subtype="FLOAT")
    mono = load_audio(wav)
    assert mono.dtype == np.float32 and len(mono) == 32000
    t16 = np.arange(32000) / 16000
    want = 0.3 * np.sin(2 * np.pi * 440 * t16) + 0.1 * np.sin(2 * np.pi * 1000 * t16)
    middle = slice(1600, 30400)  # away from the resampler's edges
    assert np.abs(mono[middle] - want[middle]).max() < 2e-3
    assert abs(np.abs(mono[middle]).max() - np.abs(want[middle]).max()) < 2e-3
    # a container libsndfile cannot read goes through ffmpeg with its channels kept
    m4a = tmp_path / "stereo.m4a"
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-nostdin",
        "-v",
        "error",
        "-i",
        str(wav),
        "-c:a",
        "aac",
        "-b:a",
        "256k",
        str(m4a),
    ]
    subprocess.run(cmd, check=True)
    decoded = load_audio(m4a)
    rms = float(np.sqrt(np.mean(decoded[3200:28800] ** 2)))
    assert abs(rms - np.sqrt(0.3**2 / 2 + 0.1**2 / 2)) < 0.01  # 0.2236: the mean, not a louder downmix


def test_streaming_buffer_keeps_exact_audio_over_long_sessions():
    """50 s pushed in 20 ms chunks through a 5 s context: every released frame's audio and every
    request window equal the input exactly, and the buffer stays bounded (it is reused, not regrown)."""
    from musetalk.audio import SAMPLES_PER_FEATURE, SAMPLES_PER_VIDEO_FRAME, StreamingAudioFeatures

    audio = np.random.default_rng(0).standard_normal(16000 * 50).astype(np.float32)
    stream = StreamingAudioFeatures(context_seconds=5.0)
    released = {}
    for start in range(0, len(audio), 320):
        for ready in stream.push(audio[start : start + 320]):
            released[ready.index] = ready.pcm
        if start % 16000 == 0 and released:
            request = stream.request([max(released)])
            first = request.first_feature * SAMPLES_PER_FEATURE
            assert np.array_equal(request.window, audio[first : first + len(request.window)])
    assert len(released) == len(audio) // SAMPLES_PER_VIDEO_FRAME - 3  # the last frames wait for look-ahead
    for index, pcm in released.items():
        assert np.array_equal(pcm, audio[index * SAMPLES_PER_VIDEO_FRAME : (index + 1) * SAMPLES_PER_VIDEO_FRAME])
    assert stream._buf.nbytes <= (5 + 4) * 16000 * 4
