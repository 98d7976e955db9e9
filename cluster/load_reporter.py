"""Worker-side reporting to the scheduler's Redis: heartbeat with load, request records.

One `LoadReporter` per worker replica. A daemon thread publishes the engine's load every
`interval_s` (TTL `heartbeat_ttl_s` in SchedulerState) and flushes buffered request progress
in the same pipeline-sized batch, so the engine's step loop never waits on Redis. `track()`
wraps a request's result stream: it claims ownership (and session/prefix affinity) when the
request starts, buffers the branch tree as events arrive, and writes the final record before
the final output is handed back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from apar_worker.types import BranchEvent, EngineStats, RequestOutput
from cluster.state import ReplicaLoad, SchedulerState, routing_keys

log = logging.getLogger("apar.load_reporter")


def current_replica_id() -> str:
    """Ray Serve's unique id of this replica, or `local-<pid>` outside a replica."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:
        return f"local-{os.getpid()}"


def current_node_id() -> str:
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id()) if ray.is_initialized() else ""
    except Exception:
        return ""


class _Progress:
    """In-memory branch tree of one request on this replica."""

    def __init__(self) -> None:
        self.tree: dict[str, dict[str, Any]] = {}
        self.new_ran: set[str] = set()
        self.all_ran: set[str] = set()
        self.dirty = False


class LoadReporter:
    """Heartbeat + request records of one worker replica."""

    def __init__(
        self,
        state: SchedulerState,
        stats_fn: Callable[[], EngineStats],
        replica_id: str | None = None,
        interval_s: float = 0.5,
    ):
        self.state = state
        self.stats_fn = stats_fn
        self.replica_id = replica_id or current_replica_id()
        self.interval_s = interval_s
        self.pid = os.getpid()
        self.node_id = current_node_id()
        self._lock = threading.Lock()
        self._requests: dict[str, _Progress] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- heartbeat ---------------------------------------------------------------------------
    def load(self) -> ReplicaLoad:
        s = self.stats_fn()
        with self._lock:
            inflight = len(self._requests)
        return ReplicaLoad(
            replica_id=self.replica_id,
            pid=self.pid,
            node_id=self.node_id,
            running_requests=s.running_requests,
            waiting_requests=s.waiting_requests,
            running_branches=s.running_branches,
            free_blocks=s.free_blocks,
            total_blocks=s.total_blocks,
            inflight=inflight,
        )

    def beat(self) -> bool:
        """One heartbeat plus a flush of buffered progress; False when Redis is down."""
        ok = self.state.heartbeat(self.load())
        self._flush()
        return ok

    def start(self) -> LoadReporter:
        if self._thread is None:
            self.beat()  # registered before the replica takes its first request
            self._thread = threading.Thread(target=self._run, name="apar-load-reporter", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception:  # the reporter must outlive any bad stats read
                log.exception("heartbeat failed")

    def stop(self) -> None:
        """Stop beating and drop the heartbeat so routers stop choosing this replica at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        self.state.remove_replica(self.replica_id)

    # -- request records ---------------------------------------------------------------------
    def request_started(self, request: Any) -> str | None:
        keys = routing_keys(request)
        if keys is None or keys.request_id is None:
            return None
        with self._lock:
            self._requests[keys.request_id] = _Progress()
        self.state.claim_request(keys.request_id, self.replica_id, keys.session_id, keys.prefix_hashes)
        return keys.request_id

    def on_event(self, ev: BranchEvent) -> None:
        """Buffer one branch event; written to Redis by the next heartbeat."""
        with self._lock:
            p = self._requests.get(ev.request_id)
            if p is None:
                return
            b = p.tree.get(str(ev.branch_id))
            if b is None:
                b = p.tree[str(ev.branch_id)] = {"parent": ev.parent_id, "tokens": [], "finish": None}
                member = f"{ev.branch_id}@{self.replica_id}"
                p.new_ran.add(member)
                p.all_ran.add(member)
            b["tokens"].extend(ev.new_token_ids)
            if ev.finish_reason is not None:
                b["finish"] = ev.finish_reason
            p.dirty = True

    def request_finished(self, request_id: str, out: RequestOutput | None) -> None:
        with self._lock:
            p = self._requests.pop(request_id, None)
        if p is None:
            return
        if out is not None:  # the final tree is authoritative (covers requests run without events)
            for b in out.branches:
                key = str(b.id)
                entry = p.tree.setdefault(key, {"parent": b.parent, "tokens": [], "finish": None})
                entry["finish"] = b.finish_reason
                entry["num_tokens"] = b.num_tokens
                p.all_ran.add(f"{b.id}@{self.replica_id}")
        state = out.finish_reason if out is not None else "aborted"
        self.state.finish_request(request_id, self.replica_id, state, p.tree, p.all_ran)

    def _flush(self) -> None:
        updates: dict[str, tuple[str, dict[str, Any], set[str]]] = {}
        with self._lock:
            for rid, p in self._requests.items():
                if p.dirty:
                    tree = {k: dict(v, tokens=list(v["tokens"])) for k, v in p.tree.items()}
                    updates[rid] = (self.replica_id, tree, set(p.new_ran))
                    p.new_ran.clear()
                    p.dirty = False
        if updates:
            self.state.record_progress(updates)

    async def track(
        self, request: Any, stream: AsyncIterator[list[BranchEvent | RequestOutput]]
    ) -> AsyncIterator[list[BranchEvent | RequestOutput]]:
        """Pass a request's stream of item lists through, recording ownership, progress and the
        final record.

        Redis writes at the start and end run in a thread so the replica's event loop never
        blocks on Redis (they fail fast while it is down).
        """
        rid = await asyncio.to_thread(self.request_started, request)
        final: RequestOutput | None = None
        try:
            async for batch in stream:
                for item in batch:
                    if isinstance(item, BranchEvent):
                        self.on_event(item)
                    elif isinstance(item, RequestOutput):
                        final = item
                        if rid is not None:
                            await asyncio.to_thread(self.request_finished, rid, item)
                            rid = None
                yield batch
        finally:
            if rid is not None:
                await asyncio.to_thread(self.request_finished, rid, final)
