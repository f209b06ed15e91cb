"""The Serve autoscaling policy on queued frames and sessions (plain numbers, no cluster)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from musetalk.serve.autoscale import QueuedFramesPolicy


def metrics(queued, sessions, capacity):
    return {
        "queued_frames": dict(enumerate(queued)),
        "sessions": dict(enumerate(sessions)),
        "capacity": dict(enumerate(capacity)),
    }


@pytest.mark.parametrize(
    ("queued", "sessions", "capacity", "current", "want"),
    [
        ([0, 0], [0, 0], [10, 10], 2, 1),  # idle: down one at a time
        ([0, 0, 0], [0, 0, 0], [10, 10, 10], 3, 2),
        ([2, 3], [9, 9], [10, 10], 2, 2),  # 18 sessions fit 2 replicas of 10 with 1 free each
        ([2, 3], [10, 10], [10, 10], 2, 3),  # no headroom left: one more
        ([40, 30], [4, 4], [10, 10], 2, 5),  # frames pile up: 70 queued / 16 per replica
        ([0], [3], [0], 1, 1),  # not measured yet: the default capacity (4) serves 3 with headroom
    ],
)
def test_policy_scales_on_queued_frames_and_sessions(queued, sessions, capacity, current, want):
    assert QueuedFramesPolicy().desired(metrics(queued, sessions, capacity), current) == want


def test_policy_respects_serve_bounds_and_the_config_names_it():
    ctx = SimpleNamespace(aggregated_metrics=metrics([500], [1], [10]), current_num_replicas=1,
                          capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state={})  # fmt: skip
    assert QueuedFramesPolicy()(ctx)[0] == 4
    config = yaml.safe_load((Path(__file__).parents[1] / "configs/serve/musetalk.yaml").read_text())
    app = config["applications"][0]
    assert app["import_path"] == "musetalk.serve.deployment:app_builder"
    policy = app["deployments"][0]["autoscaling_config"]["policy"]
    assert policy["policy_function"] == "musetalk.serve.autoscale:QueuedFramesPolicy"
    QueuedFramesPolicy(**policy["policy_kwargs"])
