"""Redis key schema and operations of the branch-affine scheduler (docs/design.md, "Cluster").

Every key lives under `apar:{namespace}:` and expires, so a stopped cluster leaves nothing
behind. Redis holds soft state only: every method tolerates an outage by failing fast (short
socket timeouts), warning once per outage, counting the error and returning "unknown"
(None / empty); the client reconnects by itself once Redis answers again.

Keys (`P` = `apar:{namespace}:`):
  P replica:{replica_id}   JSON ReplicaLoad              heartbeat, TTL ~3 s
  P dead:{replica_id}      "1"                           a caller saw it die, TTL 30 s
  P owner:{request_id}     replica_id                    request ownership, TTL request_ttl_s
  P progress:{request_id}  hash replica/state/tree/...   branch tree + tokens so far, TTL request_ttl_s
  P ran:{request_id}       set "branch_id@replica_id"    replica-side record of where branches ran
  P session:{session_id}   replica_id                    conversation affinity, TTL affinity_ttl_s
  P prefix:{hash}          replica_id                    prompt-prefix affinity, TTL affinity_ttl_s
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cluster.config import default, default_config_dict
from cluster.redis_url import redact_url, redis_url_problem
from cluster.routing_types import (  # noqa: F401  (re-exported: callers import them from here)
    MAX_PREFIX_CHUNKS,
    PREFIX_CHUNK_CHARS,
    ReplicaLoad,
    RouteInfo,
    RoutingKeys,
    canonical_prompt,
    prefix_hashes,
    routing_keys,
)

log = logging.getLogger("apar.state")
T = TypeVar("T")


_METRIC: Any = None


def _redis_error_metric(namespace: str) -> None:
    """Bump `apar_redis_errors_total` (Prometheus, through Ray's metrics export) inside Ray."""
    global _METRIC
    if _METRIC is None:
        try:
            import ray
            from ray.util.metrics import Counter

            if not ray.is_initialized():
                return
            _METRIC = Counter(
                "apar_redis_errors_total",
                "Scheduler calls that found Redis unreachable (answered 'unknown')",
                tag_keys=("namespace",),
            )
        except Exception:
            _METRIC = False
    if _METRIC:
        _METRIC.inc(1, tags={"namespace": namespace})


def _decode(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


class SchedulerState:
    """Typed access to the scheduler's Redis keys, degrading to "unknown" while Redis is down."""

    def __init__(
        self,
        url: str,
        namespace: str = default("redis", "namespace"),
        *,
        socket_timeout_s: float = 0.25,
        retry_after_s: float = 0.5,
        heartbeat_ttl_s: float = default("redis", "heartbeat_ttl_s"),
        request_ttl_s: float = default("redis", "progress_ttl_s"),
        finished_ttl_s: float = 120.0,
        affinity_ttl_s: float = default("redis", "affinity_ttl_s"),
    ):
        problem = redis_url_problem(url)
        if problem:
            raise ValueError(f"redis url: {problem}")
        self.url = url
        self.namespace = namespace
        self.prefix = f"apar:{namespace}:"
        self.heartbeat_ttl_ms = int(heartbeat_ttl_s * 1000)
        self.request_ttl_s = int(request_ttl_s)
        self.finished_ttl_s = int(finished_ttl_s)
        self.affinity_ttl_s = int(affinity_ttl_s)
        self.retry_after_s = retry_after_s
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            health_check_interval=0,
            retry=Retry(NoBackoff(), 1),  # one immediate retry reconnects a stale pooled socket
        )
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._next_try = 0.0
        self.errors = 0  # failed calls, for metrics
        self.outages = 0  # distinct outages seen
        self.on_error: Callable[[], None] | None = None  # e.g. bumps a Prometheus counter

    # -- outage handling -------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """False while the last call failed (until a retry succeeds)."""
        return self._down_since is None

    def _call(self, fn: Callable[[redis.Redis], T], default: T) -> T:
        now = time.monotonic()
        if self._down_since is not None and now < self._next_try:
            self._count_error()
            return default  # fail fast during an outage; try again every retry_after_s
        try:
            result = fn(self._client)
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                self._next_try = time.monotonic() + self.retry_after_s
                if self._down_since is None:
                    self._down_since = now
                    self.outages += 1
                    log.warning(
                        "redis %s unreachable (%s): routing degrades to defaults", self._safe_url(), exc
                    )
            self._count_error()
            return default
        if self._down_since is not None:
            with self._lock:
                if self._down_since is not None:
                    log.warning(
                        "redis %s reachable again after %.1f s", self._safe_url(), now - self._down_since
                    )
                    self._down_since = None
        return result

    def retry_now(self) -> None:
        """Skip the rest of the outage back-off: the next call tries Redis at once."""
        self._next_try = 0.0

    def _count_error(self) -> None:
        self.errors += 1
        try:
            _redis_error_metric(self.namespace)
            if self.on_error is not None:
                self.on_error()
        except Exception:  # a metrics hook must never break routing
            pass

    def _safe_url(self) -> str:
        return redact_url(self.url)

    def k(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    def ping(self) -> bool:
        return bool(self._call(lambda r: r.ping(), False))

    def close(self) -> None:
        self._client.close()

    # -- replicas ----------------------------------------------------------------------------
    def heartbeat(self, load: ReplicaLoad) -> bool:
        """Publish a replica's load with a TTL; clears a stale `dead` mark (it is alive)."""

        def op(r: redis.Redis) -> bool:
            p = r.pipeline(transaction=False)
            p.set(self.k("replica", load.replica_id), load.to_json(), px=self.heartbeat_ttl_ms)
            p.delete(self.k("dead", load.replica_id))
            p.execute()
            return True

        return self._call(op, False)

    def remove_replica(self, replica_id: str) -> None:
        self._call(lambda r: r.delete(self.k("replica", replica_id)), 0)

    def mark_dead(self, replica_id: str, ttl_s: int = 30) -> None:
        """A caller saw this replica die: stop routing to it before its heartbeat expires."""

        def op(r: redis.Redis) -> None:
            p = r.pipeline(transaction=False)
            p.delete(self.k("replica", replica_id))
            p.set(self.k("dead", replica_id), "1", ex=ttl_s)
            p.execute()

        self._call(op, None)

    def replica_loads(self, replica_ids: Iterable[str] | None = None) -> dict[str, ReplicaLoad] | None:
        """Live heartbeats (of the given replicas, or all by SCAN); None when Redis is down."""

        def op(r: redis.Redis) -> dict[str, ReplicaLoad]:
            if replica_ids is None:
                keys = sorted(r.scan_iter(match=self.k("replica", "*"), count=500))
            else:
                keys = [self.k("replica", i) for i in replica_ids]
            raws = r.mget(keys) if keys else []
            out = {}
            for raw in raws:
                if raw is not None:
                    load = ReplicaLoad.from_json(raw)
                    out[load.replica_id] = load
            return out

        return self._call(op, None)

    # -- routing lookup ----------------------------------------------------------------------
    def route_info(
        self,
        request_id: str | None,
        session_id: str | None,
        hashes: Sequence[str],
        replica_ids: Sequence[str],
    ) -> RouteInfo | None:
        """Owner, affinities, loads and dead marks in one pipeline; None when Redis is down."""

        def op(r: redis.Redis) -> RouteInfo:
            p = r.pipeline(transaction=False)
            p.get(self.k("owner", request_id)) if request_id else p.echo("")
            p.get(self.k("session", session_id)) if session_id else p.echo("")
            p.mget([self.k("prefix", h) for h in hashes]) if hashes else p.echo("")
            p.mget([self.k("replica", i) for i in replica_ids]) if replica_ids else p.echo("")
            p.mget([self.k("dead", i) for i in replica_ids]) if replica_ids else p.echo("")
            owner, session, prefixes, loads, dead = p.execute()
            info = RouteInfo(owner=_decode(owner) or None, session_replica=_decode(session) or None)
            if hashes:
                for i in range(len(hashes) - 1, -1, -1):
                    if prefixes[i] is not None:
                        info.prefix_replica, info.prefix_chunks = _decode(prefixes[i]), i + 1
                        break
            if replica_ids:
                for rid, raw, d in zip(replica_ids, loads, dead, strict=True):
                    if d is not None:
                        info.dead.add(rid)
                    elif raw is not None:
                        info.loads[rid] = ReplicaLoad.from_json(raw)
            return info

        return self._call(op, None)

    # -- request records (written by the replica that runs the request) ----------------------
    def claim_request(
        self, request_id: str, replica_id: str, session_id: str | None, hashes: Sequence[str]
    ) -> bool:
        """Record that this replica owns the request, and point its session and prefixes here."""

        def op(r: redis.Redis) -> bool:
            p = r.pipeline(transaction=False)
            p.set(self.k("owner", request_id), replica_id, ex=self.request_ttl_s)
            fields = {"state": "running", "tree": "{}"}
            self._queue_progress(p, request_id, replica_id, fields, set(), self.request_ttl_s)
            if session_id:
                p.set(self.k("session", session_id), replica_id, ex=self.affinity_ttl_s)
            for h in hashes:
                p.set(self.k("prefix", h), replica_id, ex=self.affinity_ttl_s)
            p.execute()
            return True

        return self._call(op, False)

    def record_progress(self, updates: dict[str, tuple[str, dict[str, Any], set[str]]]) -> bool:
        """Batch progress: request_id -> (replica_id, branch tree, new "branch@replica" members)."""

        def op(r: redis.Redis) -> bool:
            p = r.pipeline(transaction=False)
            for rid, (replica_id, tree, ran) in updates.items():
                fields = {"tree": json.dumps(tree)}
                self._queue_progress(p, rid, replica_id, fields, ran, self.request_ttl_s)
            p.execute()
            return True

        return self._call(op, False) if updates else True

    def finish_request(
        self, request_id: str, replica_id: str, state: str, tree: dict[str, Any], ran: set[str]
    ) -> bool:
        """Final record; ownership goes, the audit records stay for `finished_ttl_s`."""

        def op(r: redis.Redis) -> bool:
            p = r.pipeline(transaction=False)
            fields = {"state": state, "tree": json.dumps(tree)}
            self._queue_progress(p, request_id, replica_id, fields, ran, self.finished_ttl_s)
            p.delete(self.k("owner", request_id))
            p.execute()
            return True

        return self._call(op, False)

    def _queue_progress(
        self, p: Any, rid: str, replica_id: str, fields: dict[str, str], ran: set[str], ttl_s: int
    ) -> None:
        """Queue on pipeline `p` one write of the progress hash and the ran set, both expiring."""
        pk = self.k("progress", rid)
        p.hset(pk, mapping={"replica": replica_id, **fields, "updated": time.time()})
        p.expire(pk, ttl_s)
        if ran:
            p.sadd(self.k("ran", rid), *sorted(ran))
        p.expire(self.k("ran", rid), ttl_s)

    def owner(self, request_id: str) -> str | None:
        return _decode(self._call(lambda r: r.get(self.k("owner", request_id)), None))

    def progress(self, request_id: str) -> dict[str, Any] | None:
        """The request's progress record: replica, state, tree (branch_id -> info), updated."""

        def op(r: redis.Redis) -> dict[str, Any] | None:
            raw = r.hgetall(self.k("progress", request_id))
            if not raw:
                return None
            d = {_decode(a): _decode(b) for a, b in raw.items()}
            d["tree"] = json.loads(d.get("tree") or "{}")
            return d

        return self._call(op, None)

    def ran_on(self, request_id: str) -> dict[str, set[str]] | None:
        """branch_id -> replicas it produced tokens on (replica-side record)."""

        def op(r: redis.Redis) -> dict[str, set[str]]:
            out: dict[str, set[str]] = {}
            for m in r.smembers(self.k("ran", request_id)):
                bid, rep = _decode(m).split("@", 1)  # type: ignore[union-attr]
                out.setdefault(bid, set()).add(rep)
            return out

        return self._call(op, None)

    def request_status(self, request_id: str) -> dict[str, Any] | None:
        """Owner, progress and where each branch ran, as `apar status --request` shows them."""
        prog = self.progress(request_id)
        if prog is None:
            return None
        ran = self.ran_on(request_id) or {}
        branches = {
            bid: {
                "parent": b.get("parent"),
                "tokens": b.get("num_tokens", len(b.get("tokens", []))),
                "finish": b.get("finish"),
                "ran_on": sorted(ran.get(bid, ())),
            }
            for bid, b in sorted(prog["tree"].items(), key=lambda kv: int(kv[0]))
        }
        return {
            "request_id": request_id,
            "owner": self.owner(request_id),
            "replica": prog.get("replica"),
            "state": prog.get("state"),
            "branches": branches,
        }

    def session_replica(self, session_id: str) -> str | None:
        return _decode(self._call(lambda r: r.get(self.k("session", session_id)), None))

    def prefix_replica(self, hashes: Sequence[str]) -> tuple[str | None, int]:
        info = self.route_info(None, None, hashes, [])
        return (info.prefix_replica, info.prefix_chunks) if info else (None, 0)

    def clear_namespace(self) -> int:
        """Delete every key of this namespace (tests, `apar serve` start-up)."""

        def op(r: redis.Redis) -> int:
            keys = list(r.scan_iter(match=f"{self.prefix}*", count=1000))
            return int(r.delete(*keys)) if keys else 0

        return self._call(op, 0)


def state_from_config(redis_section: dict[str, Any] | None, **kwargs: Any) -> SchedulerState | None:
    """SchedulerState from the config's `redis:` section (url None: $APAR_REDIS_URL); None if no URL."""
    import os

    section = {**default_config_dict()["redis"], **(redis_section or {})}
    url = section["url"] or os.environ.get("APAR_REDIS_URL")
    if not url:
        return None
    return SchedulerState(
        url,
        section["namespace"],
        heartbeat_ttl_s=float(section["heartbeat_ttl_s"]),
        request_ttl_s=float(section["progress_ttl_s"]),
        affinity_ttl_s=float(section["affinity_ttl_s"]),
        **kwargs,
    )
