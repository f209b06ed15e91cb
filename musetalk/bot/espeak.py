"""An offline text-to-speech service for Pipecat built on the espeak-ng program.

Why: the avatar must be able to speak with no account, no network and no downloaded voice
model. espeak-ng is a small system package (run.sh / test.sh install it) that starts in a few
milliseconds and synthesises far faster than real time on a CPU, so it is the built-in voice:
robotic, but always there. Audio streams to Pipecat as espeak-ng writes it, so the avatar can
start moving before the sentence is synthesised; an interruption kills the espeak-ng process.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from loguru import logger
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import CancelFrame, EndFrame, ErrorFrame, Frame, TTSAudioRawFrame
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.utils.errors import ErrorCategory
from pipecat.utils.tracing.service_decorators import traced_tts
from pipecat.utils.types import NOT_GIVEN, NotGiven

from musetalk.errors import ConfigError

NOT_INSTALLED = (
    "espeak-ng is not installed: run `bash run.sh` (it installs it) or `sudo apt-get install espeak-ng`, "
    "or pick another tts.service in the bot config."
)
CHUNK_SECONDS = 0.04  # one avatar video frame (25 fps) of audio per TTSAudioRawFrame
READ_BYTES = 8192
MAX_HEADER_BYTES = 4096  # espeak-ng's header is 44 bytes; give up on a stream that has none


def espeak_executable() -> str | None:
    """Path of the espeak-ng (or older espeak) program, or None when neither is installed."""
    return shutil.which("espeak-ng") or shutil.which("espeak")


def _resolve_executable(executable: str | None) -> str:
    """The program to run; ConfigError (saying how to install it) when it does not exist."""
    if executable is None:
        found = espeak_executable()
    elif os.sep in executable:
        found = executable if os.path.isfile(executable) and os.access(executable, os.X_OK) else None
    else:
        found = shutil.which(executable)
    if found is None:
        detail = "" if executable is None else f" (no runnable program at {executable!r})"
        raise ConfigError(NOT_INSTALLED + detail)
    return found


def parse_wav_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(sample_rate, channels, bits, offset of the PCM) of a streamed WAV, None until complete.

    Why a chunk walk: espeak-ng writes to a pipe, so the RIFF and data sizes are placeholders
    (0x7ffff0xx); only the chunk layout can be trusted, and everything after "data" is audio.
    """
    if len(data) < 12:
        return None
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("espeak-ng did not write WAV audio")
    pos, fmt = 12, None
    while len(data) >= pos + 8:
        chunk_id, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk_id == b"data":
            if fmt is None:
                raise ValueError("espeak-ng's WAV audio has no format chunk")
            return (*fmt, pos + 8)
        if len(data) < pos + 8 + size:
            return None
        if chunk_id == b"fmt ":
            body = data[pos + 8 : pos + 8 + size]
            channels = int.from_bytes(body[2:4], "little")
            fmt = (int.from_bytes(body[4:8], "little"), channels, int.from_bytes(body[14:16], "little"))
        pos += 8 + size + (size & 1)
    return None


@dataclass
class EspeakTTSSettings(TTSSettings):
    """Settings for EspeakTTSService (voice is an espeak-ng voice name, e.g. "en-us").

    Parameters:
        words_per_minute: Speaking rate (espeak-ng's -s); None keeps espeak-ng's default (175).
    """

    words_per_minute: int | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)


class EspeakTTSService(TTSService):
    """Pipecat TTS service that speaks with the local espeak-ng program (offline, no model)."""

    Settings = EspeakTTSSettings
    _settings: Settings

    def __init__(
        self,
        *,
        voice: str = "en-us",
        words_per_minute: int | None = None,
        executable: str | None = None,
        settings: Settings | None = None,
        **kwargs,
    ):
        """Find espeak-ng now, so a missing install fails at bot start with how to fix it.

        Args:
            voice: espeak-ng voice (`espeak-ng --voices` lists them).
            words_per_minute: Speaking rate; None keeps espeak-ng's default.
            executable: Program to run; default espeak-ng (or espeak) found on PATH.
            settings: Runtime-updatable settings; they win over voice / words_per_minute.
            **kwargs: Passed to Pipecat's TTSService (sample_rate, text_aggregation_mode, ...).
        """
        default_settings = self.Settings(model=None, voice=voice, language=None, words_per_minute=words_per_minute)
        if settings is not None:
            default_settings.apply_update(settings)
        super().__init__(push_start_frame=True, push_stop_frames=True, settings=default_settings, **kwargs)
        self._executable = _resolve_executable(executable)
        self._processes: dict[str, asyncio.subprocess.Process] = {}

    @property
    def executable(self) -> str:
        """The espeak-ng program this service runs."""
        return self._executable

    def can_generate_metrics(self) -> bool:
        """TTFB and usage metrics are reported."""
        return True

    def _command(self) -> list[str]:
        command = [self._executable, "--stdout", "--stdin", "-v", str(self._settings.voice or "en-us")]
        wpm = self._settings.words_per_minute
        if isinstance(wpm, int) and wpm > 0:
            command += ["-s", str(wpm)]
        return command

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame, None]:
        """Speak text with espeak-ng, yielding ~40 ms TTSAudioRawFrames as they are synthesised.

        The text goes on stdin (never through a shell). The process is killed when the
        generation stops early (interruption, cancel), in the finally below.
        """
        logger.debug(f"{self}: espeak-ng speaking [{text}]")
        process = None
        try:
            await self.start_tts_usage_metrics(text)
            process = await asyncio.create_subprocess_exec(
                *self._command(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            self._processes[context_id] = process
            await self._send_text(process, text)
            produced = False
            async for frame in self._stream_pcm(process, context_id):
                produced = True
                await self.stop_ttfb_metrics()
                yield frame
            returncode = await process.wait()
            if self._processes.get(context_id) is not process:
                return  # killed on purpose (interruption, cancel): nothing to report
            if returncode != 0:
                yield await self._failure_frame(process, returncode)
            elif not produced:
                logger.warning(f"{self}: espeak-ng said nothing for [{text}]")
        except FileNotFoundError as e:
            yield ErrorFrame(error=f"{NOT_INSTALLED} ({e})", category=ErrorCategory.INVALID_REQUEST)
        except Exception as e:  # report, never raise: the pipeline keeps running
            logger.exception(f"{self}: espeak-ng failed")
            yield ErrorFrame(error=f"espeak-ng could not speak {text[:40]!r}: {e}", exception=e)
        finally:
            if process is not None:
                if self._processes.get(context_id) is process:
                    del self._processes[context_id]
                await self._reap(process)
            await self.stop_ttfb_metrics()

    @staticmethod
    async def _send_text(process: asyncio.subprocess.Process, text: str) -> None:
        """Text on stdin; espeak-ng exits at once on a bad voice, which the exit code reports."""
        try:
            process.stdin.write(text.encode("utf-8"))
            await process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            process.stdin.close()

    async def _stream_pcm(self, process: asyncio.subprocess.Process, context_id: str) -> AsyncGenerator[Frame, None]:
        """Parse espeak-ng's WAV stream and yield it resampled, in CHUNK_SECONDS frames."""
        header, source_rate, chunk_bytes = b"", 0, 0
        pcm = bytearray()
        resampler = create_stream_resampler(clear_after_secs=None)  # one stream per sentence
        while data := await process.stdout.read(READ_BYTES):
            if not source_rate:
                header += data
                parsed = parse_wav_header(header)
                if parsed is None:
                    if len(header) > MAX_HEADER_BYTES:
                        raise ValueError("espeak-ng wrote no WAV header")
                    continue
                source_rate, channels, bits, offset = parsed
                if channels != 1 or bits != 16:
                    raise ValueError(f"espeak-ng wrote {channels}-channel {bits}-bit audio, expected mono 16-bit")
                chunk_bytes = 2 * max(1, int(source_rate * CHUNK_SECONDS))
                data = header[offset:]
            pcm += data
            while len(pcm) >= chunk_bytes:
                audio = await self._resample(resampler, bytes(pcm[:chunk_bytes]), source_rate)
                del pcm[:chunk_bytes]
                if audio:
                    yield TTSAudioRawFrame(audio, self.sample_rate, 1, context_id=context_id)
        if source_rate:
            pcm = pcm[: len(pcm) & ~1]
            audio = await self._resample(resampler, bytes(pcm), source_rate) if pcm else b""
            if source_rate != self.sample_rate:
                audio += await resampler.flush()
            if audio:
                yield TTSAudioRawFrame(audio, self.sample_rate, 1, context_id=context_id)

    async def _resample(self, resampler, audio: bytes, source_rate: int) -> bytes:
        if source_rate == self.sample_rate:
            return audio
        return await resampler.resample(audio, source_rate, self.sample_rate)

    async def _failure_frame(self, process: asyncio.subprocess.Process, returncode: int) -> ErrorFrame:
        """A sentence a person can act on: an unknown voice is named, with where to find voices."""
        stderr = (await process.stderr.read()).decode("utf-8", "replace").strip()
        voice = self._settings.voice
        if "voice" in stderr.lower():
            return ErrorFrame(
                error=f"espeak-ng has no voice {voice!r}: `espeak-ng --voices` lists them "
                f"(set the tts voice in the bot config). espeak-ng said: {stderr}",
                category=ErrorCategory.INVALID_REQUEST,
            )
        said = f": {stderr}" if stderr else ""
        return ErrorFrame(error=f"espeak-ng failed with exit code {returncode} (voice {voice!r}){said}")

    @staticmethod
    def _kill(process: asyncio.subprocess.Process) -> None:
        if process.returncode is None:
            try:
                process.kill()
            except ProcessLookupError:
                pass

    async def _reap(self, process: asyncio.subprocess.Process) -> None:
        """Kill espeak-ng if it still runs and drain its pipes, so asyncio closes them; never raises."""
        self._kill(process)
        try:
            await asyncio.wait_for(process.communicate(), timeout=2.0)
        except (TimeoutError, OSError, ValueError) as exc:  # asyncio's child watcher still reaps the process
            logger.debug("{}: espeak-ng pipes not drained: {}", self, exc)

    def _kill_all(self) -> None:
        processes = list(self._processes.values())
        self._processes.clear()
        for process in processes:
            self._kill(process)

    async def on_audio_context_interrupted(self, context_id: str):
        """An interruption drops this context: stop synthesising it at once."""
        await super().on_audio_context_interrupted(context_id)
        process = self._processes.pop(context_id, None)
        if process is not None:
            self._kill(process)  # run_tts's finally drains and reaps it

    async def stop(self, frame: EndFrame):
        """Graceful end: the pending sentences were spoken; kill any straggler."""
        await super().stop(frame)
        self._kill_all()

    async def cancel(self, frame: CancelFrame):
        """Cancel: kill every espeak-ng this service started."""
        self._kill_all()
        await super().cancel(frame)
