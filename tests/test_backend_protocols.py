"""One way in: `make_backend` picks the backend, both backends and both bot managers keep one surface."""

from __future__ import annotations

import pytest

from musetalk.bot.manager import BotManager, BotManagerBase
from musetalk.bot.runner import BotRunner
from musetalk.bot.workers import WorkerBotRunner
from musetalk.errors import ConfigError
from musetalk.live.backend import GenerationBackend
from musetalk.live.service import GenerationService, ServiceSettings
from musetalk.serve.backend import make_backend
from musetalk.serve.client import RayGenerationClient


def _members(protocol: type) -> list[str]:
    return [name for name in dir(protocol) if not name.startswith("_")]


def test_both_backends_offer_the_backend_surface():
    for cls in (GenerationService, RayGenerationClient):
        assert [m for m in _members(GenerationBackend) if not hasattr(cls, m)] == [], cls.__name__


def test_both_bot_managers_offer_the_manager_surface():
    for cls in (BotRunner, WorkerBotRunner):
        assert issubclass(cls, BotManagerBase)
        assert [m for m in _members(BotManager) if not hasattr(cls, m)] == [], cls.__name__


def test_inproc_backend_is_a_new_service_with_the_given_settings(models):
    settings = ServiceSettings(max_sessions=3)
    first = make_backend("inproc", models=models, settings=settings)
    second = make_backend("inproc", models=models, settings=settings)
    assert isinstance(first, GenerationService) and isinstance(first, GenerationBackend)
    assert first is not second and first is not GenerationService.for_models(models)
    assert first.settings is settings
    with pytest.raises(ConfigError, match="loaded models"):
        make_backend("inproc")


def test_bot_runner_without_a_service_makes_its_own(models):
    runner = BotRunner(models, max_bots=2)
    assert runner.max_bots == 2 and not runner.running and runner.bots() == []
    assert isinstance(runner.service, GenerationService) and runner.service is runner.service
    assert runner.status().state == "stopped"
    with pytest.raises(ConfigError, match="bot-9"):
        runner.status("bot-9")
