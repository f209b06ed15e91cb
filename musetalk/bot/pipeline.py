"""The bot's pipeline: room audio -> Silero VAD -> MuseTalkProcessor -> avatar video + audio out."""

from __future__ import annotations

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.transports.base_transport import BaseTransport, TransportParams

from musetalk.bot.processor import MuseTalkProcessor
from musetalk.config import AUDIO_SAMPLE_RATE, VIDEO_FPS

# Short start delay: the mouth can only move once VAD says "speech", and the audio
# look-ahead (132.5 ms) already covers most of it.
VAD_PARAMS = VADParams(confidence=0.6, start_secs=0.1, stop_secs=0.3, min_volume=0.4)


def transport_params(processor: MuseTalkProcessor, *, daily: bool = False) -> TransportParams:
    """Audio in at 16 kHz (what whisper wants), avatar-sized video out at 25 fps."""
    width, height = processor.video_size
    kwargs = dict(
        audio_in_enabled=True,
        audio_in_sample_rate=AUDIO_SAMPLE_RATE,
        audio_out_enabled=True,
        audio_out_sample_rate=AUDIO_SAMPLE_RATE if processor.settings.mode == "mirror" else None,
        audio_out_end_silence_secs=0,
        video_out_enabled=True,
        # Not "live": in Pipecat 1.14 images queued with their audio (sync_with_audio) only
        # replace the current image, which the transport's own 25 fps video loop sends.
        video_out_is_live=False,
        video_out_width=width,
        video_out_height=height,
        video_out_framerate=VIDEO_FPS,
    )
    if daily:
        from pipecat.transports.daily.transport import DailyParams

        return DailyParams(**kwargs)
    return TransportParams(**kwargs)


def build_pipeline(transport: BaseTransport, processor: MuseTalkProcessor) -> Pipeline:
    """Mirror mode: whoever speaks in the room is lip-synced by the avatar."""
    vad = VADProcessor(vad_analyzer=SileroVADAnalyzer(sample_rate=AUDIO_SAMPLE_RATE, params=VAD_PARAMS))
    return Pipeline([transport.input(), vad, processor, transport.output()])
