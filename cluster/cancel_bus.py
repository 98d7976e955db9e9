"""Cancel reaches a request on whichever ingress replica serves it.

A `Cancel` RPC lands on any ingress replica, but only the one streaming the request can abort
it. Every ingress replica listens on one Redis channel (`apar:{namespace}:cancel`); a replica
that does not hold the request publishes its id there if the request's owner record says it is
still running, and the holder cancels it. Without Redis only the local path is left.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

log = logging.getLogger("apar.cancel")


class CancelBus:
    """Publish and receive request ids to cancel; `on_cancel(request_id)` runs on a thread."""

    def __init__(self, url: str, namespace: str, on_cancel: Callable[[str], None]) -> None:
        self.channel = f"apar:{namespace}:cancel"
        self.on_cancel = on_cancel
        self._client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="apar-cancel-bus", daemon=True)
        self.ready = threading.Event()  # set once subscribed (tests wait on it)

    def start(self) -> CancelBus:
        self._thread.start()
        return self

    def publish(self, request_id: str) -> int:
        """How many ingress replicas heard it (ourselves included); 0 when Redis is down."""
        try:
            return int(self._client.publish(self.channel, request_id))
        except redis.RedisError as exc:
            log.warning("cancel of %s not published: %s", request_id, exc)
            return 0

    def _listen(self) -> None:
        """Subscribe, and subscribe again after Redis restarts, until closed."""
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                self.ready.set()
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg and msg.get("type") == "message":
                        data = msg["data"]
                        self.on_cancel(data.decode() if isinstance(data, bytes) else str(data))
            except (redis.RedisError, OSError, ValueError):
                self.ready.clear()
                self._stop.wait(1.0)
            finally:
                try:
                    pubsub.close()
                except (redis.RedisError, OSError):
                    pass

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=3)
        self._client.close()
