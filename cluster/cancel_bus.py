"""Cancel reaches a request on whichever ingress replica serves it.

A `Cancel` RPC lands on any ingress replica, but only the one streaming the request can abort
it. Every ingress replica listens on one Redis channel (`apar:{namespace}:cancel`); a replica
that does not hold the request publishes its id there if the request's owner record says it is
still running, and the holder cancels it and acknowledges on a one-off list the publisher waits
on: the owner record outlives the request by a moment (the worker clears it as it winds down),
so only an acknowledgement says that a request was really cancelled. Without Redis only the
local path is left.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable

import redis

log = logging.getLogger("apar.cancel")
ACK_TIMEOUT_S = 2.0  # how long a publisher waits for the holder's acknowledgement


class CancelBus:
    """Publish and receive request ids to cancel; `on_cancel(request_id)` runs on a thread and
    returns whether this replica held (and cancelled) the request."""

    def __init__(self, url: str, namespace: str, on_cancel: Callable[[str], bool]) -> None:
        self.channel = f"apar:{namespace}:cancel"
        self.on_cancel = on_cancel
        # blocking waits for an acknowledgement need a read timeout longer than the wait
        self._client = redis.Redis.from_url(
            url, socket_timeout=ACK_TIMEOUT_S + 1.0, socket_connect_timeout=1.0
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="apar-cancel-bus", daemon=True)
        self.ready = threading.Event()  # set once subscribed (tests wait on it)

    def start(self) -> CancelBus:
        self._thread.start()
        return self

    def publish(self, request_id: str, ack_timeout_s: float = ACK_TIMEOUT_S) -> bool:
        """Whether another replica held the request and cancelled it; False when Redis is down."""
        ack = f"{self.channel}:ack:{uuid.uuid4().hex}"
        try:
            heard = int(self._client.publish(self.channel, json.dumps({"id": request_id, "ack": ack})))
            if heard <= 1:  # we hear our own message: nobody else is listening
                return False
            return self._client.blpop([ack], timeout=ack_timeout_s) is not None
        except redis.RedisError as exc:
            log.warning("cancel of %s not published: %s", request_id, exc)
            return False

    def _heard(self, data: bytes | str) -> None:
        try:
            msg = json.loads(data)
            rid, ack = str(msg["id"]), str(msg["ack"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed cancel message")
            return
        if self.on_cancel(rid):
            pipe = self._client.pipeline()
            pipe.rpush(ack, 1).expire(ack, 30)
            pipe.execute()

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
                        self._heard(msg["data"])
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
