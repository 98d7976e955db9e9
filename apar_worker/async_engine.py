"""asyncio front-end of the engine: a background thread runs the step loop.

The forward pass releases the GIL, so stepping in a thread keeps the event loop (gRPC, Ray)
responsive. Results are handed to each request's asyncio.Queue with call_soon_threadsafe;
a consumer that goes away (client cancel, deadline) aborts its request so its KV blocks
return to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from apar_worker.engine import Engine, EngineConfig
from apar_worker.types import BranchEvent, EngineStats, GenerateRequest, RequestOutput

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, *, engine: Engine | None = None) -> None:
        self.engine = engine or Engine(config)
        self._lock = threading.Lock()  # one thread touches the engine at a time
        self._wake = threading.Event()
        self._stopped = False
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="apar-engine-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped:
            with self._lock:
                busy = self.engine.has_unfinished()
                try:
                    items = self.engine.step() if busy else []
                except Exception:  # keep serving: fail what is in flight, never kill the loop
                    log.exception("engine step raised; failing in-flight requests")
                    for rid in list(self.engine.requests):
                        self.engine.abort(rid, "error")
                    items = []
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            for item in items:
                target = self._queues.get(item.request_id)
                if target is not None:
                    loop, queue = target
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, item)
                    except RuntimeError:  # the consumer's loop is closed
                        pass

    async def generate(self, request: GenerateRequest) -> AsyncIterator[BranchEvent | RequestOutput]:
        """Yields BranchEvents as they happen, then exactly one RequestOutput.

        Raises InvalidRequestError before yielding anything if the request is malformed.
        """
        queue: asyncio.Queue = asyncio.Queue()
        rid = request.request_id
        with self._lock:
            self.engine.add_request(request)
            self._queues[rid] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, RequestOutput):
                    finished = True
                    yield item
                    return
                yield item
        finally:
            with self._lock:
                if not finished:
                    self.engine.abort(rid)
                self._queues.pop(rid, None)
            self._wake.set()

    async def cancel(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)
        self._wake.set()

    def stats(self) -> EngineStats:
        with self._lock:
            return self.engine.stats()

    async def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 5.0)
