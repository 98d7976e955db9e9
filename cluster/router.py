"""`AparRouter`: Ray Serve RequestRouter for the worker deployment, backed by Redis (docs/design.md, "Cluster").

Policy, per request:
  1. replicas without a live heartbeat, or marked dead, are not chosen (unless none has one);
  2. a request that is already owned (a retry), then its session, then its longest known prompt
     prefix go to the replica that holds them, unless that replica is overloaded;
  3. otherwise replicas are ranked least-loaded first (queue length, then free KV fraction).
If Redis is unreachable (or not configured) the router falls back to Ray's default
power-of-two choice, with a warning once per outage and a counter.

The returned ranks hold one replica each, so Ray tries them in our order and moves to the next
only if a replica rejects the request (its `max_ongoing_requests` is full). The base class
matches a chosen replica to exactly the request it was chosen for (no FIFOMixin), which keeps
affinity decisions intact.

Enable with `RequestRouterConfig(request_router_class="cluster.router:AparRouter",
request_router_kwargs=cluster.config.router_kwargs(cfg))`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from cluster.config import default
from cluster.state import (
    PREFIX_CHUNK_CHARS,
    ReplicaLoad,
    RouteInfo,
    RoutingKeys,
    SchedulerState,
    routing_keys,
    state_from_config,
)

log = logging.getLogger("ray.serve")


@dataclass
class Thresholds:
    """When a replica counts as overloaded (affinity is then ignored for it)."""

    max_waiting: int = default("router", "overload_queue_len")  # more waiting requests than this
    min_free_kv_fraction: float = default("router", "overload_min_free_kv_fraction")  # or less free KV


def _overloaded(load: ReplicaLoad | None, t: Thresholds) -> bool:
    if load is None:
        return False
    return load.waiting_requests > t.max_waiting or load.free_kv_fraction < t.min_free_kv_fraction


def rank_replicas(
    candidates: Sequence[str],
    info: RouteInfo,
    keys: RoutingKeys | None,
    thresholds: Thresholds,
    local_queue: dict[str, int] | None = None,
    pending: dict[str, int] | None = None,
) -> tuple[list[str], str]:
    """Order candidate replica ids by preference; returns (order, reason). Pure: unit-tested.

    Queue length per replica: `local_queue` (this router's fresh count of ongoing requests, from
    Ray's queue-length cache) where known, else the heartbeat's; plus `pending`, requests this
    router has just chosen the replica for but not yet sent (heartbeats lag by up to a period).
    """
    local_queue, pending = local_queue or {}, pending or {}
    alive = [c for c in candidates if c in info.loads]
    if not alive:  # no heartbeats at all (e.g. all just started): anything not known dead
        alive = [c for c in candidates if c not in info.dead] or list(candidates)

    def score(c: str) -> tuple[bool, int, float]:
        load = info.loads.get(c)
        qlen = local_queue[c] if c in local_queue else (load.queue_len if load else 0)
        qlen += pending.get(c, 0)
        free = load.free_kv_fraction if load else 1.0
        return (_overloaded(load, thresholds), qlen, -free)

    ordered = sorted(alive, key=score)
    if keys is not None:
        for target, reason in (
            (info.owner, "owner"),
            (info.session_replica, "session"),
            (info.prefix_replica, "prefix"),
        ):
            if target and target in alive:
                if not _overloaded(info.loads.get(target), thresholds):
                    return [target] + [c for c in ordered if c != target], reason
    return ordered, "least-loaded"


def keys_of(pending: PendingRequest | None, chunk_chars: int = PREFIX_CHUNK_CHARS) -> RoutingKeys | None:
    """Routing keys from the first call argument (positional or keyword) that carries any."""
    if pending is None:
        return None
    for arg in [*pending.args, *pending.kwargs.values()]:
        keys = routing_keys(arg, chunk_chars)
        if keys is not None:
            return keys
    return None


class AparRouter(RequestRouter):
    """Branch-affine, load-aware routing from Redis state; power-of-two fallback."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._state: SchedulerState | None = None
        self._thresholds = Thresholds()
        self._chunk_chars = PREFIX_CHUNK_CHARS
        self._died: set[str] = set()
        # Chosen but not yet confirmed by Ray (internal id -> (replica, time)): concurrent routing
        # tasks see each other's picks before the first request is even sent.
        self._tentative: dict[str, tuple[str, float]] = {}
        self.decisions: Counter[str] = (
            Counter()
        )  # reason -> count (owner/session/prefix/least-loaded/fallback)
        self._fallback_warned = False
        self._metric: Any = None

    def initialize_state(  # type: ignore[override]
        self,
        redis: dict[str, Any] | None = None,
        overload_queue_len: int = Thresholds.max_waiting,
        overload_min_free_kv_fraction: float = Thresholds.min_free_kv_fraction,
        prefix_affinity_chars: int = PREFIX_CHUNK_CHARS,
        **_: Any,
    ) -> None:
        """Called by Ray Serve with `request_router_kwargs` (cluster.config.router_kwargs)."""
        self._thresholds = Thresholds(int(overload_queue_len), float(overload_min_free_kv_fraction))
        self._chunk_chars = int(prefix_affinity_chars)
        self._state = state_from_config(redis)
        if self._state is None:
            log.warning("AparRouter: no redis url; routing uses power-of-two choice only")

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # we return every candidate
        by_id = {
            r.replica_id.unique_id: r for r in candidate_replicas if r.replica_id.unique_id not in self._died
        }
        if not by_id:
            by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if not by_id:
            return []
        keys = keys_of(pending_request, self._chunk_chars)
        info: RouteInfo | None = None
        if self._state is not None:
            info = await asyncio.to_thread(
                self._state.route_info,
                keys.request_id if keys else None,
                keys.session_id if keys else None,
                keys.prefix_hashes if keys else [],
                list(by_id),
            )
        if info is None:
            return self._fallback(list(by_id.values()))
        self._fallback_warned = False
        order, reason = rank_replicas(
            list(by_id), info, keys, self._thresholds, self._local_queue(by_id), self._pending()
        )
        self._count(reason)
        if pending_request is not None and order:
            self._tentative[pending_request.metadata.internal_request_id] = (order[0], time.monotonic())
        return [[by_id[i]] for i in order]

    def _fallback(self, replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
        """Ray's default: two random replicas, the shorter queue wins (Ray probes them)."""
        self._count("fallback")
        if not self._fallback_warned:
            self._fallback_warned = True
            log.warning("AparRouter: redis unavailable, falling back to power-of-two choice routing")
        return [random.sample(replicas, k=min(2, len(replicas)))]

    def _count(self, reason: str) -> None:
        """Decision counter, also exported as the Prometheus metric apar_router_decisions_total."""
        self.decisions[reason] += 1
        if self._metric is None:
            try:
                from ray.util.metrics import Counter as RayCounter

                self._metric = RayCounter(
                    "apar_router_decisions_total",
                    "AparRouter routing decisions by reason (fallback = Redis unavailable)",
                    tag_keys=("reason",),
                )
            except Exception:  # metrics are best effort (e.g. outside a Ray worker)
                self._metric = False
        if self._metric:
            self._metric.inc(1, tags={"reason": reason})

    def _local_queue(self, by_id: dict[str, RunningReplica]) -> dict[str, int]:
        """Ongoing requests per replica from Ray's queue-length cache (bumped on every send,
        lowered on completion, refreshed by the replicas' own replies); fresher than heartbeats."""
        out = {}
        for uid, r in by_id.items():
            q = self.replica_queue_len_cache.get(r.replica_id)
            if q is not None:
                out[uid] = int(q)
        return out

    def _pending(self) -> dict[str, int]:
        """Requests chosen for a replica by this router but not sent yet."""
        q: Counter[str] = Counter()
        now = time.monotonic()
        for rid, (uid, t) in list(self._tentative.items()):
            if now - t > 5.0:  # routing was abandoned (cancelled call)
                del self._tentative[rid]
            else:
                q[uid] += 1
        return dict(q)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        self._tentative.pop(pending_request.metadata.internal_request_id, None)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        self._tentative.pop(internal_request_id, None)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        """Stop choosing it here at once, and tell the other routers through Redis."""
        super().on_replica_actor_died(replica_id)
        uid = replica_id.unique_id
        self._died.add(uid)
        if self._state is not None:
            try:
                asyncio.get_running_loop().run_in_executor(None, self._state.mark_dead, uid)
            except RuntimeError:
                self._state.mark_dead(uid)

    @property
    def fallback_count(self) -> int:
        return self.decisions["fallback"]
