"""Request routing that keeps a live session on its replica.

Opening a session goes by Serve's model multiplexing (the avatar digest is the model id), so
it lands on a replica that already holds that avatar when one exists. Every later call of the
session carries the model id `DIGEST@REPLICA`: this router sends it to that replica and to no
other while the replica lives. When the replica is gone the request falls back to ordinary
routing; the replica it reaches does not know the session and says so, and the client
re-attaches the session (`musetalk.serve.client`).
"""

from __future__ import annotations

import importlib

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

PIN = "@"
KNOWN_REPLICAS: dict[str, tuple[str, ...]] = {}  # deployment -> replica ids seen by this process's routers


def pinned_id(avatar_key: str, replica: str) -> str:
    return f"{avatar_key}{PIN}{replica}"


class PinnedRouter(PowerOfTwoChoicesRequestRouter):
    """Power-of-two-choices with multiplexing, plus strict pins for open sessions."""

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        # Serve may hand this process a by-value copy of the class: record in the imported module.
        module = importlib.import_module(__name__)
        module.KNOWN_REPLICAS[str(self._deployment_id)] = tuple(sorted(r.replica_id.unique_id for r in replicas))

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        model_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if PIN in model_id:
            wanted = model_id.rsplit(PIN, 1)[1]
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == wanted:
                    return [[replica]]
        return await super().choose_replicas(candidate_replicas, pending_request)
