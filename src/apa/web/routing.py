"""How the cluster's HTTP proxy picks an ingress replica: by default two at random and the less
loaded (Ray Serve's power of two choices); a request that names a running replica in the header
``serve_multiplexed_model_id`` goes to that one (every response names its replica in
``X-Apa-Replica``). Pinning is for speed and for tests that must reach a given replica; no
replica holds anything a request needs, so an unknown or dead replica's name is simply ignored.

This module imports only Ray: the proxy loads it without torch or the rest of apa.
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import FIFOMixin, RequestRouter

PIN_HEADER = "serve_multiplexed_model_id"  # Ray's proxy copies this header into the request's routing metadata
REPLICA_HEADER = "X-Apa-Replica"  # each response's replica (its Serve replica id)


class PinnedRouter(FIFOMixin, RequestRouter):
    """Ray Serve's request router for the ingress (see the module docstring)."""

    async def choose_replicas(self, candidate_replicas: list[Any], pending_request: Any = None) -> list[list[Any]]:
        """[[the named replica]] if it is among the running ones, else [[two at random]] (the router sends
        the request to whichever of them reports the shorter queue)."""
        wanted = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        pinned = [r for r in candidate_replicas if wanted and r.replica_id.unique_id == wanted]
        if pinned:
            return [pinned]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))] if candidate_replicas else []
