"""cluster.state against a real redis-server: key schema, TTLs, heartbeats, ownership, progress,
affinity, Redis outages and reconnects, TLS; and cluster.redis_server's restart."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis
from redis_fixtures import raw

from cluster.redis_server import RedisServer
from cluster.state import (
    ReplicaLoad,
    SchedulerState,
    canonical_prompt,
    prefix_hashes,
    routing_keys,
    state_from_config,
)


def test_redis_server_restart_keeps_port_and_password_url():
    with RedisServer(password="s3cret") as srv:
        port = srv.port
        assert srv.url.startswith("redis://:s3cret@127.0.0.1:")
        assert raw(srv).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).set("x", 1)
        srv.stop()
        assert not srv.running
        with pytest.raises(redis.ConnectionError):
            redis.Redis(host="127.0.0.1", port=port, password="s3cret", socket_timeout=0.5).ping()
        assert srv.restart() == srv.url and srv.port == port
        assert raw(srv).ping()


def test_url_schemes(monkeypatch):
    st = SchedulerState("rediss://:pw@127.0.0.1:1/0")
    assert st._client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert st._client.connection_pool.connection_kwargs["password"] == "pw"
    assert "pw" not in st._safe_url()
    with pytest.raises(ValueError, match="redis url"):
        SchedulerState("http://127.0.0.1:6379")
    monkeypatch.delenv("APAR_REDIS_URL", raising=False)
    assert state_from_config({"url": None}) is None
    monkeypatch.setenv("APAR_REDIS_URL", "redis://127.0.0.1:7/0")
    st2 = state_from_config({"url": None, "namespace": "ns", "heartbeat_ttl_s": 2.0})
    assert st2.url == "redis://127.0.0.1:7/0" and st2.prefix == "apar:ns:" and st2.heartbeat_ttl_ms == 2000


def test_every_key_is_namespaced_and_expires(state, server):
    state.heartbeat(ReplicaLoad("r1", pid=1, free_blocks=5, total_blocks=10))
    hashes = prefix_hashes("x" * 1000)
    assert state.claim_request("req1", "r1", "sess1", hashes)
    state.record_progress({"req1": ("r1", {"0": {"parent": None, "tokens": [1, 2]}}, {"0@r1"})})
    state.mark_dead("r2")
    keys = raw(server).keys("*")
    assert keys and all(k.startswith(state.prefix) for k in keys)
    kinds = {k[len(state.prefix) :].split(":")[0] for k in keys}
    assert kinds == {"replica", "owner", "progress", "ran", "session", "prefix", "dead"}
    for k in keys:
        assert raw(server).pttl(k) > 0, k
    state.finish_request("req1", "r1", "stop", {"0": {"parent": None}}, {"0@r1"})
    assert state.owner("req1") is None
    assert 0 < raw(server).ttl(state.k("progress", "req1")) <= state.finished_ttl_s


def test_heartbeat_ttl_expiry_and_dead_mark(server):
    st = SchedulerState(server.url, namespace="ttl", heartbeat_ttl_s=0.4)
    st.clear_namespace()
    st.heartbeat(ReplicaLoad("a", pid=11, free_blocks=3, total_blocks=4))
    st.heartbeat(ReplicaLoad("b", pid=12))
    loads = st.replica_loads()
    assert set(loads) == {"a", "b"} and loads["a"].pid == 11 and loads["a"].free_kv_fraction == 0.75
    st.mark_dead("b")
    info = st.route_info(None, None, [], ["a", "b"])
    assert set(info.loads) == {"a"} and info.dead == {"b"}
    st.heartbeat(ReplicaLoad("b", pid=12))  # alive after all: the dead mark goes
    assert st.route_info(None, None, [], ["a", "b"]).dead == set()
    time.sleep(0.6)
    assert st.replica_loads() == {}
    st.close()


def test_ownership_progress_and_affinity(state):
    t1 = [{"role": "system", "content": "You are helpful. " * 40}, {"role": "user", "content": "List tips."}]
    t2 = [*t1, {"role": "assistant", "content": "1. Sleep: ..."}, {"role": "user", "content": "More?"}]
    h1 = prefix_hashes(canonical_prompt(None, t1, None))
    h2 = prefix_hashes(canonical_prompt(None, t2, None))
    assert len(h1) >= 2 and h2[: len(h1)] == h1  # turn 2 extends turn 1's prefix chain
    other = prefix_hashes(canonical_prompt(None, [{"role": "user", "content": "z" * 600}], None))
    assert not set(other) & set(h1)

    state.claim_request("r-1", "rep-A", "s-1", h1)
    assert state.owner("r-1") == "rep-A"
    assert state.session_replica("s-1") == "rep-A"
    assert state.prefix_replica(h2) == ("rep-A", len(h1))
    assert state.prefix_replica(other) == (None, 0)

    state.record_progress({"r-1": ("rep-A", {"0": {"parent": None, "tokens": [5, 6]}}, {"0@rep-A"})})
    prog = state.progress("r-1")
    assert prog["replica"] == "rep-A" and prog["state"] == "running" and prog["tree"]["0"]["tokens"] == [5, 6]
    assert state.ran_on("r-1") == {"0": {"rep-A"}}

    state.heartbeat(ReplicaLoad("rep-A", pid=1))
    state.heartbeat(ReplicaLoad("rep-B", pid=2))
    info = state.route_info("r-1", "s-1", h2, ["rep-A", "rep-B"])
    assert (info.owner, info.session_replica, info.prefix_replica) == ("rep-A", "rep-A", "rep-A")
    assert set(info.loads) == {"rep-A", "rep-B"}


def test_routing_keys_from_request_objects():
    from apar_worker.types import GenerateRequest

    req = GenerateRequest(prompt="p" * 600, request_id="abc", session_id="s")
    keys = routing_keys(req)
    assert keys.request_id == "abc" and keys.session_id == "s" and len(keys.prefix_hashes) == 2
    assert routing_keys({"request_id": "x", "prefix_hashes": ["h"]}).prefix_hashes == ["h"]
    assert routing_keys(42) is None


def test_redis_down_fails_fast_warns_once_and_reconnects(server, caplog):
    st = SchedulerState(server.url, namespace="down", retry_after_s=0.2)
    assert st.heartbeat(ReplicaLoad("a", pid=1))
    server.stop()
    caplog.set_level(logging.WARNING, logger="apar.state")
    t0 = time.monotonic()
    results = [st.route_info("r", "s", ["h"], ["a"]) for _ in range(50)]
    results += [st.owner("r"), st.replica_loads(), st.progress("r")]
    assert time.monotonic() - t0 < 2.0
    assert all(r is None for r in results)
    assert st.heartbeat(ReplicaLoad("a", pid=1)) is False and st.available is False
    assert st.errors >= 54 and st.outages == 1
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1
    server.start()  # same port
    deadline = time.monotonic() + 5
    while not st.heartbeat(ReplicaLoad("a", pid=1)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert st.available and set(st.replica_loads()) == {"a"}
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    st.close()


class TLSProxy:
    """TLS endpoint in front of the plain test redis-server (its redis-server has no TLS built
    in), so `rediss://` URLs are exercised over a real TLS handshake."""

    def __init__(self, cert: str, key: str, target_port: int):
        import ssl
        import threading

        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready) -> None:
        asyncio.set_event_loop(self.loop)

        async def pipe(reader, writer):
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def handle(client_r, client_w):
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                client_w.close()
                return
            await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))

        async def main():
            self.server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=self.ctx)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        self.loop.run_until_complete(main())
        self.loop.run_forever()
        self.loop.close()

    def close(self) -> None:
        async def shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_rediss_url_over_tls_with_password(tmp_path):
    import subprocess

    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    with RedisServer(password="tls-pw") as srv:
        proxy = TLSProxy(cert, key, srv.port)
        try:
            url = f"rediss://:tls-pw@127.0.0.1:{proxy.port}/0?ssl_ca_certs={cert}"
            st = SchedulerState(url, namespace="tls")
            assert st.heartbeat(ReplicaLoad("t1", pid=7)) and st.replica_loads()["t1"].pid == 7
            st.close()
            # Without our CA the server's certificate is rejected: unknown, never an exception.
            untrusted = SchedulerState(f"rediss://:tls-pw@127.0.0.1:{proxy.port}/0", namespace="tls")
            assert untrusted.replica_loads() is None and untrusted.errors == 1
            untrusted.close()
            # A wrong password over TLS is refused the same way.
            wrong = SchedulerState(f"rediss://:nope@127.0.0.1:{proxy.port}/0?ssl_ca_certs={cert}", "tls")
            assert wrong.replica_loads() is None
            wrong.close()
        finally:
            proxy.close()


def test_request_status_shows_owner_progress_and_where_branches_ran(state):
    from cluster.cli_status import format_request_status

    assert state.request_status("nobody") is None
    assert "no record" in format_request_status("nobody", None)
    state.claim_request("q7", "rep-A", None, [])
    tree = {"0": {"parent": None, "tokens": [1, 2, 3]}, "1": {"parent": 0, "tokens": [4]}}
    state.record_progress({"q7": ("rep-A", tree, {"0@rep-A", "1@rep-A"})})
    status = state.request_status("q7")
    assert status["owner"] == "rep-A" and status["state"] == "running"
    assert status["branches"]["0"] == {"parent": None, "tokens": 3, "finish": None, "ran_on": ["rep-A"]}
    assert "owned by rep-A" in format_request_status("q7", status)
    state.finish_request(
        "q7", "rep-A", "stop", {"0": {"parent": None, "finish": "stop", "num_tokens": 5}}, set()
    )
    status = state.request_status("q7")
    assert status["owner"] is None and status["state"] == "stop" and status["branches"]["0"]["tokens"] == 5
    assert "branch 0 (root): 5 tokens, stop, ran on rep-A" in format_request_status("q7", status)
