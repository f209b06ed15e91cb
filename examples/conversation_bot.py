#!/usr/bin/env python
"""A Pipecat voice agent whose face is a MuseTalk avatar: talk to any OpenAI-compatible LLM.

    pip install .                                   # the library (or: bash run.sh in this checkout)
    python -m musetalk prepare me.mp4 --name me     # once: an avatar
    ollama serve & ollama pull llama3.2             # or any OpenAI-compatible endpoint, see below
    MUSETALK_AVATAR=me python examples/conversation_bot.py     # then open http://localhost:7860/client

The pipeline is Pipecat's usual agent with `MuseTalkProcessor` placed after the TTS, like Pipecat's
own avatar services: transport in -> VAD -> STT -> context -> LLM -> TTS -> MuseTalk -> transport out.
It greets the visitor, answers, and stops talking the moment the visitor speaks over it.

Environment: MUSETALK_AVATAR (default avatar_1), MUSETALK_MODELS_DIR, MUSETALK_AVATARS_DIR,
MUSETALK_DEVICE (auto, cpu or cuda), LLM_BASE_URL (default http://127.0.0.1:11434/v1, Ollama),
LLM_MODEL (llama3.2), LLM_API_KEY, STT_BASE_URL (http://127.0.0.1:8000/v1, e.g. speaches),
STT_API_KEY. The voice is espeak-ng (offline).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import LLMRunFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.openai.stt import OpenAISTTService
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

from musetalk.avatar.store import AvatarStore
from musetalk.bot.espeak import EspeakTTSService
from musetalk.bot.processor import LiveSettings, MuseTalkProcessor
from musetalk.config import ModelPaths, RuntimeSettings
from musetalk.models import load_models

SYSTEM_PROMPT = "You are a friendly assistant shown as a talking face. Answer in one or two short sentences."
GREETING_REQUEST = "Greet the visitor in one short sentence."
_models = None  # loaded once per process, shared by every visitor


async def bot(runner_args: RunnerArguments) -> None:
    """Called by Pipecat's development runner for every visitor of the page."""
    global _models
    if _models is None:
        paths = ModelPaths(Path(os.environ.get("MUSETALK_MODELS_DIR", "models")))
        runtime = RuntimeSettings(device=os.environ.get("MUSETALK_DEVICE", "auto"))
        _models = await asyncio.to_thread(load_models, paths, runtime)
    store = AvatarStore(Path(os.environ.get("MUSETALK_AVATARS_DIR", "avatars")))
    avatar = await asyncio.to_thread(store.load, os.environ.get("MUSETALK_AVATAR", "avatar_1"))

    # The avatar's video size decides the transport's; its audio leaves together with the frames.
    avatar_video = MuseTalkProcessor(models=_models, avatar=avatar, settings=LiveSettings(mode="conversation"))
    width, height = avatar_video.video_size
    params = TransportParams(
        audio_in_enabled=True, audio_in_sample_rate=16000, audio_out_enabled=True,
        video_out_enabled=True, video_out_width=width, video_out_height=height, video_out_framerate=25,
    )  # fmt: skip
    transport = await create_transport(runner_args, {"webrtc": lambda: params})
    stt = OpenAISTTService(
        base_url=os.environ.get("STT_BASE_URL", "http://127.0.0.1:8000/v1"),
        api_key=os.environ.get("STT_API_KEY", "none"),
        settings=OpenAISTTService.Settings(model="whisper-1"),
    )
    llm = OpenAILLMService(
        base_url=os.environ.get("LLM_BASE_URL", "http://127.0.0.1:11434/v1"),
        api_key=os.environ.get("LLM_API_KEY", "none"),
        settings=OpenAILLMService.Settings(
            model=os.environ.get("LLM_MODEL", "llama3.2"), system_instruction=SYSTEM_PROMPT
        ),
    )
    context = LLMContext()
    aggregators = LLMContextAggregatorPair(context)
    pipeline = Pipeline(
        [
            transport.input(),
            VADProcessor(vad_analyzer=SileroVADAnalyzer()),
            stt,
            aggregators.user(),
            llm,
            EspeakTTSService(voice="en-us"),
            avatar_video,  # TTS audio in -> lip-synced video + the same audio out
            transport.output(),
            aggregators.assistant(),
        ]
    )
    worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True), idle_timeout_secs=None)

    @transport.event_handler("on_client_connected")
    async def greet(_transport, _client) -> None:
        logger.info("A visitor connected: greeting them")
        context.add_message({"role": "user", "content": GREETING_REQUEST})
        await worker.queue_frames([LLMRunFrame()])

    @transport.event_handler("on_client_disconnected")
    async def leave(_transport, _client) -> None:
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(worker)
    await runner.run()


if __name__ == "__main__":
    from pipecat.runner.run import main

    main()
