"""An ended bot keeps its status record, not what it ran with (its avatar may be GPU tensors)."""

from __future__ import annotations

import gc
import weakref

from musetalk.bot.runner import BotRunner
from musetalk.bot.transports import TransportSettings


def test_an_ended_bot_keeps_its_status_not_its_avatar(models, avatar_store, prepared_avatar):
    runner = BotRunner(models)
    status = runner.start("astro", TransportSettings(kind="local", port=0), avatar_store=avatar_store)
    run = runner._runs[status.bot_id]
    avatar = weakref.ref(run.avatar)
    assert avatar() is not None and avatar() is not prepared_avatar  # loaded for this bot by name
    assert runner.stop().state == "stopped"
    gc.collect()
    assert avatar() is None, gc.get_referrers(avatar())
    assert run.models is None and run.service is None
    ended = runner.status(status.bot_id)
    assert ended.state == "stopped" and ended.avatar == "astro" and ended.viewer_stats == ()
