"""A local OpenAI-compatible HTTP server, so tests drive Pipecat's real OpenAI services offline.

Why: the bot's LLM / STT / TTS are OpenAI-API clients (OpenAI itself, or a local Ollama /
speaches / vLLM server). Testing them against this stand-in exercises the real `openai`
client, the real HTTP and SSE wire format and the real Pipecat services, with replies the
test chooses, real espeak-ng speech for TTS, and every request recorded for assertions.

    with OpenAIStandIn(reply=lambda messages: "Hi.") as api:
        llm = OpenAILLMService(base_url=api.base_url, api_key="sk-test", ...)
        ...
        assert api.chat_requests()[-1].api_key == "sk-test"
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import wave
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soxr
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

DEFAULT_MODELS = ("gpt-4o-mini", "whisper-1", "gpt-4o-mini-tts", "tts-1")
DEFAULT_TRANSCRIPT = "Hello there, how are you?"
SPEECH_RATE = 24000  # OpenAI's "pcm": raw int16 mono at 24 kHz
SPEECH_CHUNK_BYTES = 4800  # 100 ms of 24 kHz int16


def message_text(message: dict[str, Any]) -> str:
    """Text of a chat message whose content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def default_reply(messages: list[dict[str, Any]]) -> str:
    """Echo: "You said: <last user message>."."""
    last_user = next((message_text(m) for m in reversed(messages) if m.get("role") == "user"), "").strip()
    return f"You said: {last_user}" if last_user.endswith((".", "!", "?")) else f"You said: {last_user}."


def default_transcribe(wav_bytes: bytes) -> str:
    return DEFAULT_TRANSCRIPT


def unreachable_url() -> str:
    """A base URL ("http://127.0.0.1:PORT/v1") where nothing listens: the port was just freed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def openai_error(status: int, message: str, error_type: str, code: str | None = None) -> JSONResponse:
    """An error in the shape OpenAI sends, which the openai client turns into APIStatusError."""
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def wav_duration(wav_bytes: bytes) -> float:
    try:
        with wave.open(io.BytesIO(wav_bytes)) as wf:
            return wf.getnframes() / wf.getframerate()
    except (wave.Error, EOFError):
        return 0.0


def espeak_pcm(text: str, voice: str = "en-us", words_per_minute: int | None = None, rate: int = SPEECH_RATE) -> bytes:
    """Speak text with espeak-ng (via a temp WAV file, whose header is exact) as int16 mono at rate."""
    executable = shutil.which("espeak-ng") or shutil.which("espeak")
    if executable is None:
        raise RuntimeError("espeak-ng is not installed on this machine (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        command = [executable, "-w", str(path), "--stdin", "-v", voice]
        if words_per_minute:
            command += ["-s", str(int(words_per_minute))]
        subprocess.run(command, input=text.encode("utf-8"), check=True, capture_output=True, timeout=60)
        with wave.open(str(path)) as wf:
            source_rate = wf.getframerate()
            samples = np.frombuffer(wf.readframes(wf.getnframes()), dtype=np.int16)
    if source_rate != rate:
        samples = soxr.resample(samples, source_rate, rate).astype(np.int16)
    return samples.tobytes()


def wav_bytes(pcm: bytes, rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(rate)
        wf.writeframes(pcm)
    return buffer.getvalue()


@dataclass
class UploadedFile:
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class RecordedRequest:
    """One request the stand-in received."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    form: dict[str, str] | None = None
    files: dict[str, UploadedFile] = field(default_factory=dict)
    authorization: str | None = None

    @property
    def has_auth(self) -> bool:
        return self.authorization is not None

    @property
    def api_key(self) -> str | None:
        """The bearer token, if the request carried one."""
        if self.authorization and self.authorization.lower().startswith("bearer "):
            return self.authorization[7:]
        return None

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Chat messages sent (the LLM context), empty for other requests."""
        return list((self.json or {}).get("messages") or [])


class OpenAIStandIn:
    """OpenAI-compatible server on 127.0.0.1 in a background thread (a context manager)."""

    def __init__(
        self,
        *,
        models: Iterable[str] = DEFAULT_MODELS,
        reply: Callable[[list[dict[str, Any]]], str] = default_reply,
        transcribe: Callable[[bytes], str] = default_transcribe,
        chunk_delay_s: float = 0.02,
        require_key: str | None = None,
        fail_after: int | None = None,
        latency_s: float = 0.0,
        espeak_voice: str = "en-us",
    ):
        """Configure replies and failures.

        Args:
            models: Names listed by GET /v1/models.
            reply: messages -> assistant text, streamed word by word.
            transcribe: uploaded file bytes (a WAV from Pipecat) -> transcript.
            chunk_delay_s: Pause before each streamed chat chunk.
            require_key: Answer 401 (OpenAI's error shape) unless this bearer key is sent.
            fail_after: Answer 500 to every chat request after the first N.
            latency_s: Wait this long before answering any request.
            espeak_voice: espeak-ng voice used for /v1/audio/speech, whatever voice is asked.
        """
        self.models = list(models)
        self.reply = reply
        self.transcribe = transcribe
        self.chunk_delay_s = chunk_delay_s
        self.require_key = require_key
        self.fail_after = fail_after
        self.latency_s = latency_s
        self.espeak_voice = espeak_voice
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._chat_count = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port = 0
        self.app = self._build_app()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """Requests whose path ends with path (e.g. "/chat/completions")."""
        return [r for r in self.requests if r.path.endswith(path)]

    def chat_requests(self) -> list[RecordedRequest]:
        return self.requests_to("/chat/completions")

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> OpenAIStandIn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._socket, self.port = sock, sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="openai-standin", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the OpenAI stand-in server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()
        self._server, self._thread, self._socket = None, None, None

    def __enter__(self) -> OpenAIStandIn:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- request handling ----------------------------------------------------------------

    def _record(self, request: Request, **fields) -> RecordedRequest:
        recorded = RecordedRequest(
            method=request.method,
            path=request.url.path,
            authorization=request.headers.get("authorization"),
            **fields,
        )
        with self._lock:
            self._requests.append(recorded)
        return recorded

    async def _gate(self, recorded: RecordedRequest) -> Response | None:
        """The key check and latency every request goes through; an error response or None."""
        if self.require_key is not None and recorded.api_key != self.require_key:
            shown = (recorded.api_key or "")[-4:]
            return openai_error(
                401,
                f"Incorrect API key provided: ...{shown}. You can find your API key in your account.",
                "invalid_request_error",
                "invalid_api_key",
            )
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return None

    def _build_app(self) -> FastAPI:
        app = FastAPI()
        app.add_api_route("/v1/models", self._models, methods=["GET"])
        app.add_api_route("/v1/chat/completions", self._chat, methods=["POST"])
        app.add_api_route("/v1/audio/transcriptions", self._transcriptions, methods=["POST"])
        app.add_api_route("/v1/audio/speech", self._speech, methods=["POST"])
        return app

    async def _models(self, request: Request) -> Response:
        if (refused := await self._gate(self._record(request))) is not None:
            return refused
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "standin"} for m in self.models]
        return JSONResponse({"object": "list", "data": data})

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        recorded = self._record(request, json=body)
        if (refused := await self._gate(recorded)) is not None:
            return refused
        with self._lock:
            self._chat_count += 1
            count = self._chat_count
        if self.fail_after is not None and count > self.fail_after:
            return openai_error(500, "The server had an error while processing your request.", "server_error")
        text = self.reply(list(body.get("messages") or []))
        model = body.get("model") or self.models[0]
        usage = _usage(body.get("messages") or [], text)
        if not body.get("stream"):
            return JSONResponse(_completion(count, model, text, usage))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = self._chat_events(count, model, text, usage if include_usage else None)
        return StreamingResponse(events, media_type="text/event-stream")

    async def _chat_events(self, count: int, model: str, text: str, usage: dict | None):
        """SSE chunks: role, one per word (with its following space), stop, usage, [DONE]."""
        created = int(time.time())

        def chunk(delta: dict, finish: str | None = None, choices: bool = True) -> str:
            payload = {
                "id": f"chatcmpl-standin-{count}",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else [],
            }
            if not choices:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        for piece in re.findall(r"\s*\S+\s*", text) or [text]:
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            yield chunk({"content": piece})
        yield chunk({}, "stop")
        if usage is not None:
            yield chunk({}, choices=False)
        yield "data: [DONE]\n\n"

    async def _transcriptions(self, request: Request) -> Response:
        form = await request.form()
        fields, files = {}, {}
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields[key] = value
            else:
                files[key] = UploadedFile(value.filename, value.content_type, await value.read())
        recorded = self._record(request, form=fields, files=files)
        if (refused := await self._gate(recorded)) is not None:
            return refused
        if "file" not in files:
            return openai_error(400, "No file was uploaded (the 'file' field).", "invalid_request_error")
        audio = files["file"].data
        text = self.transcribe(audio)
        response_format = fields.get("response_format", "json")
        if response_format == "text":
            return PlainTextResponse(text)
        if response_format == "verbose_json":
            return JSONResponse(_verbose_transcription(text, wav_duration(audio), fields.get("language")))
        if response_format == "json":
            return JSONResponse({"text": text})
        return openai_error(
            400, f"The stand-in does not produce {response_format!r} transcripts.", "invalid_request_error"
        )

    async def _speech(self, request: Request) -> Response:
        body = await request.json()
        recorded = self._record(request, json=body)
        if (refused := await self._gate(recorded)) is not None:
            return refused
        response_format = body.get("response_format", "mp3")
        if response_format not in ("pcm", "wav"):
            return openai_error(
                400, f"The stand-in speaks 'pcm' or 'wav', not {response_format!r}.", "invalid_request_error"
            )
        speed = body.get("speed") or 1.0
        try:
            pcm = await asyncio.to_thread(espeak_pcm, str(body.get("input", "")), self.espeak_voice, int(175 * speed))
        except Exception as e:
            return openai_error(500, f"The stand-in could not synthesise speech: {e}", "server_error")
        audio = pcm if response_format == "pcm" else wav_bytes(pcm, SPEECH_RATE)
        media_type = "audio/pcm" if response_format == "pcm" else "audio/wav"
        return StreamingResponse(_chunks(audio, SPEECH_CHUNK_BYTES), media_type=media_type)


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _usage(messages: list[dict[str, Any]], text: str) -> dict[str, int]:
    prompt = sum(len(message_text(m).split()) for m in messages)
    completion = len(text.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion(count: int, model: str, text: str, usage: dict) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-standin-{count}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }


def _verbose_transcription(text: str, duration: float, language: str | None) -> dict[str, Any]:
    segment = {
        "id": 0,
        "seek": 0,
        "start": 0.0,
        "end": duration,
        "text": text,
        "tokens": [],
        "temperature": 0.0,
        "avg_logprob": -0.1,
        "compression_ratio": 1.0,
        "no_speech_prob": 0.01,
    }
    return {
        "task": "transcribe",
        "language": language or "english",
        "duration": duration,
        "text": text,
        "segments": [segment],
    }
