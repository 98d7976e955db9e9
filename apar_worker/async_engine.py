"""asyncio front-end of the engine: a background thread runs the step loop.

The forward pass releases the GIL, so stepping in a thread keeps the event loop (gRPC, Ray)
responsive. Each step's results for a request go to its asyncio.Queue as one list (with
call_soon_threadsafe), so a streaming consumer can forward one message per engine step
instead of one per token; a consumer that goes away (client cancel, deadline) aborts its request so its KV blocks
return to the pool.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import threading
from collections.abc import AsyncIterator

from apar_worker.engine import Engine, EngineConfig
from apar_worker.types import BranchEvent, EngineStats, GenerateRequest, RequestOutput

log = logging.getLogger(__name__)


@functools.cache
def _freeze_startup_objects() -> None:
    """Move what exists after the first engine's start (model, tokenizer, libraries) out of the
    garbage collector's sight, as vLLM's engine does: a serving process keeps them for its life,
    and full collections traversing them took ~6 % of an int8 batch-1 step's CPU. Once per
    process; later objects are collected as usual."""
    gc.freeze()


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, *, engine: Engine | None = None) -> None:
        self.engine = engine or Engine(config)
        _freeze_startup_objects()
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
            per_request: dict[str, list[BranchEvent | RequestOutput]] = {}
            for item in items:
                per_request.setdefault(item.request_id, []).append(item)
            for rid, batch in per_request.items():
                target = self._queues.get(rid)
                if target is not None:
                    loop, queue = target
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, batch)
                    except RuntimeError:  # the consumer's loop is closed
                        pass

    async def generate(self, request: GenerateRequest) -> AsyncIterator[BranchEvent | RequestOutput]:
        """Yields BranchEvents as they happen, then exactly one RequestOutput.

        Raises InvalidRequestError before yielding anything if the request is malformed.
        """
        steps = self.generate_steps(request)
        try:
            async for batch in steps:
                for item in batch:
                    yield item
        finally:
            await steps.aclose()  # abort now if the consumer left early, not at garbage collection

    async def generate_steps(
        self, request: GenerateRequest
    ) -> AsyncIterator[list[BranchEvent | RequestOutput]]:
        """Like `generate`, but yields every item produced since the last yield as one list.

        A list holds one or more engine steps' events (more when the consumer fell behind);
        the last list ends with the RequestOutput.
        """
        queue: asyncio.Queue = asyncio.Queue()
        rid = request.request_id
        with self._lock:
            self.engine.add_request(request)
            self._queues[rid] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                batch = list(await queue.get())
                while not queue.empty():
                    batch += queue.get_nowait()
                finished = isinstance(batch[-1], RequestOutput)
                yield batch
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
