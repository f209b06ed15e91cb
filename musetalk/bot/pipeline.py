"""The bot's pipeline: room audio -> Silero VAD -> MuseTalkProcessor -> avatar video + audio out."""

from __future__ import annotations

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.transports.base_transport import BaseTransport, TransportParams

from musetalk.bot.daily import DailyRoomSettings
from musetalk.bot.processor import MuseTalkProcessor
from musetalk.config import AUDIO_SAMPLE_RATE, VIDEO_FPS

# Short start delay: the mouth can only move once VAD says "speech", and the audio
# look-ahead (132.5 ms) already covers most of it.
VAD_PARAMS = VADParams(confidence=0.6, start_secs=0.1, stop_secs=0.3, min_volume=0.4)


def transport_params(processor: MuseTalkProcessor, *, room: DailyRoomSettings | None = None) -> TransportParams:
    """Audio in at 16 kHz (what whisper wants), avatar-sized video out at 25 fps.

    In a Daily room (`room`): audio out only where the room settings publish it, and one video
    layer at 25 fps and the stated bitrate (unless simulcast was asked for).
    """
    width, height = processor.video_size
    kwargs = dict(
        audio_in_enabled=True,
        audio_in_sample_rate=AUDIO_SAMPLE_RATE,
        audio_out_enabled=processor.publish_audio,
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
    if room is not None:
        from pipecat.transports.daily.transport import DailyParams

        return DailyParams(**kwargs, camera_out_send_settings=room.camera_send_settings(VIDEO_FPS))
    return TransportParams(**kwargs)


def room_input(transport: BaseTransport, voice: FrameProcessor | None = None) -> list[FrameProcessor]:
    """The transport's input, then (in a Daily room) the filter that lets only the followed voice through."""
    return [transport.input()] if voice is None else [transport.input(), voice]


def build_pipeline(
    transport: BaseTransport, processor: MuseTalkProcessor, voice: FrameProcessor | None = None
) -> Pipeline:
    """Mirror mode: the followed speaker (the local page's viewer, or one person of a Daily room) is lip-synced."""
    vad = VADProcessor(vad_analyzer=SileroVADAnalyzer(sample_rate=AUDIO_SAMPLE_RATE, params=VAD_PARAMS))
    return Pipeline([*room_input(transport, voice), vad, processor, transport.output()])
