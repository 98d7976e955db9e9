"""cluster.cancel_bus on a real redis-server: a cancel published by one ingress reaches the others."""

from __future__ import annotations

import threading
import time

import redis
from redis_fixtures import server  # noqa: F401

from cluster.cancel_bus import CancelBus


def _wait(pred, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_cancel_reaches_every_listener_and_survives_a_redis_restart(server):  # noqa: F811
    heard: dict[str, list[str]] = {"a": [], "b": [], "other": []}
    holds = {"a": set(), "b": {"req-1", "req-2"}, "other": {"req-1"}}
    lock = threading.Lock()

    def listener(name: str):
        def on_cancel(rid: str) -> bool:
            with lock:
                heard[name].append(rid)
            return rid in holds[name]

        return on_cancel

    a = CancelBus(server.url, "t-bus", listener("a")).start()
    b = CancelBus(server.url, "t-bus", listener("b")).start()
    other = CancelBus(server.url, "t-other", listener("other")).start()  # another namespace
    try:
        assert a.ready.wait(5) and b.ready.wait(5)
        assert a.publish("req-1") is True  # b held it and acknowledged
        assert _wait(lambda: heard["b"] == ["req-1"] and heard["a"] == ["req-1"])
        assert other.ready.wait(5) and heard["other"] == []
        # heard by both, held by neither (e.g. it ended a moment ago): not cancelled
        started = time.monotonic()
        assert a.publish("req-gone", ack_timeout_s=0.5) is False
        assert time.monotonic() - started < 3
        assert _wait(lambda: "req-gone" in heard["b"])
        server.restart()
        assert _wait(lambda: a.publish("req-2", ack_timeout_s=0.5), 20), (
            "listeners subscribe again after a restart"
        )
        server.stop()
        assert a.publish("req-1") is False  # Redis down: nobody heard it, no exception
    finally:
        for bus in (a, b, other):
            bus.close()
        server.start()


def test_a_malformed_message_on_the_channel_is_ignored(server):  # noqa: F811
    heard: list[str] = []
    a = CancelBus(server.url, "t-junk", lambda rid: heard.append(rid) or True).start()
    b = CancelBus(server.url, "t-junk", lambda rid: False).start()
    try:
        assert a.ready.wait(5) and b.ready.wait(5)
        redis.Redis.from_url(server.url).publish("apar:t-junk:cancel", b"not json")
        assert b.publish("req-9") is True, "the listener survives the junk and still acknowledges"
        assert heard == ["req-9"]
    finally:
        a.close()
        b.close()
