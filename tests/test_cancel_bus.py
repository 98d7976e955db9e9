"""cluster.cancel_bus on a real redis-server: a cancel published by one ingress reaches the others."""

from __future__ import annotations

import threading
import time

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
    lock = threading.Lock()

    def listener(name: str):
        def on_cancel(rid: str) -> None:
            with lock:
                heard[name].append(rid)

        return on_cancel

    a = CancelBus(server.url, "t-bus", listener("a")).start()
    b = CancelBus(server.url, "t-bus", listener("b")).start()
    other = CancelBus(server.url, "t-other", listener("other")).start()  # another namespace
    try:
        assert a.ready.wait(5) and b.ready.wait(5)
        assert a.publish("req-1") == 2  # both replicas heard it, the publisher included
        assert _wait(lambda: heard["b"] == ["req-1"] and heard["a"] == ["req-1"])
        assert other.ready.wait(5) and heard["other"] == []
        server.restart()
        assert _wait(lambda: a.publish("req-2") == 2, 20), "listeners subscribe again after a restart"
        assert _wait(lambda: "req-2" in heard["b"])
        server.stop()
        assert a.publish("req-3") == 0  # Redis down: nobody heard it, no exception
    finally:
        for bus in (a, b, other):
            bus.close()
        server.start()
