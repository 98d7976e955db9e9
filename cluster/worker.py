"""AparWorker: the Ray Serve deployment whose every replica owns one APAR engine.

The engine (`apar_worker.async_engine.AsyncEngine`) runs its own step loop, so all requests on a
replica are batched together (continuous batching) and all branches of a request share this
replica's KV blocks. `generate` streams the engine's items back to the ingress through a
streaming DeploymentHandle, one list per engine step (a Ray item per token would cap
streamed throughput), or per `worker.stream_interval_s` while other requests run here (each
Ray item costs milliseconds of CPU across the replica, the ingress and the proxy: at 16
streams on 2 CPUs, 0.25 s gave 1.44x the output tokens/s of one item per step); the first
item names the replica, so every event the client sees says where it was produced. The
scheduler's LoadReporter publishes this replica's load and records which branches ran here
(replica-side records in Redis: `ran:{request_id}`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from apar_worker.types import BranchEvent, GenerateRequest, RequestOutput
from cluster.config import WORKER_DEPLOYMENT, load_config_dict
from cluster.load_reporter import LoadReporter, current_replica_id
from cluster.metrics import WorkerMetrics
from cluster.protocol import RequestIdInUse
from cluster.state import state_from_config

log = logging.getLogger("ray.serve")


@serve.deployment(name=WORKER_DEPLOYMENT)
class AparWorker:
    """One engine per replica; requests arrive as `apar_worker.types.GenerateRequest`."""

    def __init__(self, config: dict[str, Any]):
        from apar_worker.async_engine import AsyncEngine
        from apar_worker.engine import EngineConfig

        self.cfg = load_config_dict(config)
        self.replica_id = current_replica_id()
        self.engine = AsyncEngine(EngineConfig(**self.cfg.engine_kwargs()))
        self.metrics = WorkerMetrics(self.replica_id, self.cfg.model)
        state = state_from_config(dataclasses.asdict(self.cfg.redis))
        self.reporter: LoadReporter | None = None
        if state is not None:
            self.reporter = LoadReporter(
                state, self.engine.stats, self.replica_id, interval_s=self.cfg.redis.heartbeat_interval_s
            ).start()
        self._running: set[str] = set()  # ids of the requests in `generate` now
        self._stop = threading.Event()
        threading.Thread(target=self._sample_metrics, name="apar-metrics", daemon=True).start()
        log.info("AparWorker %s ready: model %s", self.replica_id, self.cfg.model)

    def _sample_metrics(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.metrics.observe_engine(self.engine.stats())
            except Exception:  # metrics must never take the replica down
                log.exception("metrics sampling failed")

    async def generate(
        self, req: GenerateRequest, timeout_s: float = 0.0, events: bool = False
    ) -> AsyncIterator[str | list[BranchEvent | RequestOutput]]:
        """Yields this replica's id, then lists of items: one engine step's BranchEvents (if
        `req.stream`, or `events`: the ingress keeps them to resume after a failover), the last
        list ending with the RequestOutput.

        `timeout_s` becomes the engine deadline (an absolute monotonic time of this process).
        If the caller goes away (cancelled call, expired gRPC deadline, Cancel RPC), Ray cancels
        this generator and the request is aborted so its KV blocks return to the pool.
        """
        rid = req.request_id
        if rid in self._running:
            # The engine keys a request's output queue and its abort by id: a second request with
            # it (from another ingress replica, or reused while the first one is still closing)
            # would take the first one's outputs or abort it.
            raise RequestIdInUse(f"request_id {rid!r} is already in flight")
        self._running.add(rid)
        stream: AsyncIterator[list[BranchEvent | RequestOutput]] | None = None
        done = False
        try:
            if timeout_s > 0:
                req.deadline = time.monotonic() + timeout_s
            yield self.replica_id
            stream = self.engine.generate_steps(req)
            if self.reporter is not None:
                stream = self.reporter.track(req, stream)
            held: list[BranchEvent | RequestOutput] = []
            last = 0.0
            async for batch in stream:
                if isinstance(batch[-1], RequestOutput):
                    done = True
                    self.metrics.observe_request(batch[-1])
                if not (req.stream or events):  # unary calls only need the final output
                    batch = batch[-1:] if done else []
                held += batch
                now = time.monotonic()
                if held and (done or now - last >= self._interval()):
                    yield held
                    held, last = [], now
        finally:
            try:
                if not done and stream is not None:  # caller gone: close the wrappers, abort in the engine
                    await stream.aclose()
                    await self.engine.cancel(rid)
            finally:
                self._running.discard(rid)

    def _interval(self) -> float:
        """Seconds between a stream's messages: `worker.stream_interval_s` while other requests
        run here (each message costs the replica, ingress and proxy milliseconds of CPU that the
        engine then lacks), else 0: a lone stream gets every step."""
        return self.cfg.worker.stream_interval_s if len(self._running) > 1 else 0.0

    def stats(self) -> dict[str, Any]:
        return {"replica_id": self.replica_id, **dataclasses.asdict(self.engine.stats())}

    async def ping(self) -> str:
        return self.replica_id

    async def __del__(self) -> None:
        """Graceful replica shutdown: leave the routing table first, then stop the engine."""
        self._stop.set()
        if self.reporter is not None:
            self.reporter.stop()
        await self.engine.shutdown()
