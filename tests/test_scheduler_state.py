"""Scheduler state against a real redis-server: key schema, TTLs, heartbeats, ownership,
affinity, routing policy, Redis outages and reconnects, and the failover stream deduper."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis
from ray.exceptions import ActorDiedError

from apar_worker.types import BranchEvent, BranchInfo, EngineStats, RequestOutput
from cluster.load_reporter import LoadReporter
from cluster.redis_server import RedisServer
from cluster.resume import ReplayMismatchError, StreamDeduper, generate_with_failover
from cluster.router import Thresholds, rank_replicas
from cluster.state import (
    ReplicaLoad,
    RouteInfo,
    RoutingKeys,
    SchedulerState,
    canonical_prompt,
    prefix_hashes,
    routing_keys,
    state_from_config,
)


@pytest.fixture(scope="module")
def server():
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def state(server, request):
    if not server.running:
        server.start()
    st = SchedulerState(
        server.url, namespace=f"t-{request.node.name}", heartbeat_ttl_s=3.0, retry_after_s=0.2
    )
    st.clear_namespace()
    yield st
    st.clear_namespace()
    st.close()


def raw(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True)


def stats(free: int = 90, total: int = 100, waiting: int = 0, running: int = 1) -> EngineStats:
    return EngineStats(
        running_requests=running,
        waiting_requests=waiting,
        running_branches=running,
        free_blocks=free,
        total_blocks=total,
        prefix_hit_rate=0.0,
        steps=0,
        num_preemptions=0,
        generated_tokens=0,
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


def _info(loads: dict[str, ReplicaLoad], **kw) -> RouteInfo:
    return RouteInfo(loads=loads, **kw)


def test_rank_replicas_policy():
    t = Thresholds(max_waiting=2, min_free_kv_fraction=0.1)
    a = ReplicaLoad("A", 1, running_requests=3, free_blocks=50, total_blocks=100)
    b = ReplicaLoad("B", 2, running_requests=1, free_blocks=80, total_blocks=100)
    keys = RoutingKeys("r", "s", ["h"])
    # least-loaded: B has the shorter queue
    assert rank_replicas(["A", "B"], _info({"A": a, "B": b}), keys, t) == (["B", "A"], "least-loaded")
    # this router's fresh queue lengths override the (lagging) heartbeats; pending picks add up
    assert rank_replicas(["A", "B"], _info({"A": a, "B": b}), keys, t, {"B": 5})[0] == ["A", "B"]
    assert rank_replicas(["A", "B"], _info({"A": a, "B": b}), keys, t, {"A": 0})[0] == ["A", "B"]
    assert rank_replicas(["A", "B"], _info({"A": a, "B": b}), keys, t, {"A": 0}, {"A": 2})[0] == ["B", "A"]
    # affinity wins over load, in the order owner > session > prefix
    assert rank_replicas(["A", "B"], _info({"A": a, "B": b}, prefix_replica="A"), keys, t) == (
        ["A", "B"],
        "prefix",
    )
    assert (
        rank_replicas(["A", "B"], _info({"A": a, "B": b}, session_replica="A", prefix_replica="B"), keys, t)[
            1
        ]
        == "session"
    )
    assert rank_replicas(["A", "B"], _info({"A": a, "B": b}, owner="B", session_replica="A"), keys, t) == (
        ["B", "A"],
        "owner",
    )
    # overloaded (waiting queue or KV) or dead/without heartbeat: affinity skipped
    busy = ReplicaLoad("A", 1, waiting_requests=3, free_blocks=50, total_blocks=100)
    assert rank_replicas(["A", "B"], _info({"A": busy, "B": b}, session_replica="A"), keys, t)[0][0] == "B"
    full = ReplicaLoad("A", 1, free_blocks=5, total_blocks=100)
    assert rank_replicas(["A", "B"], _info({"A": full, "B": b}, session_replica="A"), keys, t)[0][0] == "B"
    order, reason = rank_replicas(["A", "B"], _info({"B": b}, session_replica="A", dead={"A"}), keys, t)
    assert order == ["B"] and reason == "least-loaded"
    # nobody has a heartbeat yet: everyone not known dead stays eligible
    assert sorted(rank_replicas(["A", "B", "C"], _info({}, dead={"C"}), keys, t)[0]) == ["A", "B"]


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


def test_load_reporter_heartbeat_and_request_records(state):
    rep = LoadReporter(
        state, lambda: stats(free=40, total=100, waiting=1), replica_id="rep-1", interval_s=0.1
    )
    rep.start()
    try:
        assert state.replica_loads()["rep-1"].free_blocks == 40

        async def stream():  # one list per engine step, as AsyncEngine.generate_steps yields
            yield [BranchEvent("q1", 0, None, [1, 2], created=True)]
            yield [BranchEvent("q1", 1, 0, [3], created=True)]
            await asyncio.sleep(0.35)  # a heartbeat flushes progress meanwhile
            yield [BranchEvent("q1", 1, 0, [4], finish_reason="stop"), BranchEvent("q1", 0, None, [5])]
            yield [
                BranchEvent("q1", 0, None, [], finish_reason="stop"),
                RequestOutput(
                    "q1",
                    "text",
                    [BranchInfo(0, None, "a", 3, "stop"), BranchInfo(1, 0, "b", 2, "stop")],
                    "stop",
                    prompt_tokens=4,
                    num_tokens=5,
                    steps=3,
                    cached_tokens=0,
                ),
            ]

        from apar_worker.types import GenerateRequest

        req = GenerateRequest(prompt="hello " * 100, request_id="q1", session_id="sx")
        seen_mid: list[dict] = []

        async def run():
            out = []
            async for item in rep.track(req, stream()):
                out.append(item)
                if len(out) == 2:
                    await asyncio.sleep(0.3)
                    seen_mid.append(state.progress("q1"))
                    assert state.owner("q1") == "rep-1"
                    assert state.replica_loads()["rep-1"].inflight == 1
            return out

        items = asyncio.run(run())
        assert [len(b) for b in items] == [1, 1, 2, 2] and isinstance(items[-1][-1], RequestOutput)
        assert seen_mid[0]["state"] == "running" and seen_mid[0]["tree"]["0"]["tokens"] == [1, 2]
        prog = state.progress("q1")
        assert (
            prog["state"] == "stop"
            and prog["tree"]["1"]["tokens"] == [3, 4]
            and prog["tree"]["1"]["parent"] == 0
        )
        assert state.ran_on("q1") == {"0": {"rep-1"}, "1": {"rep-1"}}
        assert state.owner("q1") is None and state.session_replica("sx") == "rep-1"
    finally:
        rep.stop()
    assert "rep-1" not in state.replica_loads()


def _ev(b: int, ids: list[int], text: str, created: bool = False, fin: str | None = None, parent=None):
    return BranchEvent("r", b, parent, ids, delta_text=text, created=created, finish_reason=fin)


def test_deduper_forwards_each_token_once_across_a_replay():
    attempt1 = [
        _ev(0, [1, 2], "ab", created=True),
        _ev(1, [7], "x", created=True, parent=0),
        _ev(0, [3], "c"),
    ]
    attempt2 = [
        _ev(0, [1, 2], "ab", created=True),
        _ev(1, [7], "x", created=True, parent=0),
        _ev(0, [3, 4], "cd"),
        _ev(1, [8], "y", fin="stop", parent=0),
        _ev(0, [5], "e", fin="stop"),
    ]
    d = StreamDeduper()
    out = [d.filter(e) for e in attempt1]
    d.new_attempt()
    out += [d.filter(e) for e in attempt2]
    sent = [e for e in out if e is not None]
    per_branch: dict[int, list[int]] = {}
    text: dict[int, str] = {}
    for e in sent:
        per_branch.setdefault(e.branch_id, []).extend(e.new_token_ids)
        text[e.branch_id] = text.get(e.branch_id, "") + e.delta_text
    assert per_branch == {0: [1, 2, 3, 4, 5], 1: [7, 8]} and text == {0: "abcde", 1: "xy"}
    assert sum(e.created for e in sent) == 2 and sum(e.finish_reason is not None for e in sent) == 2
    d.new_attempt()
    with pytest.raises(ReplayMismatchError):
        d.filter(_ev(0, [1, 9], "a?"))


def test_generate_with_failover_retries_on_replica_death(state):
    state.claim_request("rq", "dead-rep", None, [])
    state.heartbeat(ReplicaLoad("dead-rep", pid=1))
    calls: list[int] = []

    def start(attempt: int):
        async def gen():
            calls.append(attempt)
            yield f"replica-{attempt}"
            yield [_ev(0, [1], "a", created=True)]
            if attempt == 0:
                raise ActorDiedError()
            yield [_ev(0, [2], "b", fin="stop"), "final"]

        return gen()

    async def run():
        return [x async for x in generate_with_failover(start, request_id="rq", state=state)]

    items = asyncio.run(run())
    assert calls == [0, 1]
    # the replayed step is dropped (nothing new in it); the replica ids pass through
    assert items[0] == "replica-0" and items[2] == "replica-1" and len(items) == 4
    assert items[1][0].new_token_ids == [1] and items[3][0].new_token_ids == [2] and items[3][1] == "final"
    assert state.route_info(None, None, [], ["dead-rep"]).dead == {"dead-rep"}

    def bad(attempt: int):
        async def gen():
            raise ValueError("bad request")
            yield  # pragma: no cover

        return gen()

    async def run_bad():
        return [x async for x in generate_with_failover(bad)]

    with pytest.raises(ValueError):
        asyncio.run(run_bad())


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


def test_apar_router_glue_against_real_redis(server):
    """AparRouter itself (Ray's RequestRouter base, real PendingRequest/ReplicaID, real Redis):
    affinity from Redis, dead replicas skipped and announced, power-of-two fallback when down.
    Candidates only need `replica_id` here; real RunningReplicas are used by the cluster tests."""
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
    from ray.serve.request_router import PendingRequest

    from apar_worker.types import GenerateRequest
    from cluster.router import AparRouter

    dep = DeploymentID(name="AparWorker", app_name="glue")
    router = AparRouter(deployment_id=dep, handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(redis={"url": server.url, "namespace": "glue"}, overload_queue_len=4)
    st = SchedulerState(server.url, namespace="glue", retry_after_s=0.1)
    st.clear_namespace()

    class Candidate:
        def __init__(self, uid: str):
            self.replica_id = ReplicaID(unique_id=uid, deployment_id=dep)

    cands = [Candidate(u) for u in ("A", "B", "C")]
    for uid, running, free in (("A", 3, 50), ("B", 0, 50), ("C", 1, 90)):
        st.heartbeat(ReplicaLoad(uid, pid=1, running_requests=running, free_blocks=free, total_blocks=100))

    def pending(i: int, **kw) -> PendingRequest:
        req = GenerateRequest(prompt="p" * 300, request_id=f"g{i}", **kw)
        return PendingRequest(
            args=[req, 0.0],
            kwargs={},
            metadata=RequestMetadata(request_id=f"g{i}", internal_request_id=f"i{i}"),
        )

    async def choose(pr: PendingRequest) -> list[list[str]]:
        ranks = await router.choose_replicas(cands, pr)
        return [[c.replica_id.unique_id for c in rank] for rank in ranks]

    asyncio.run(_glue_steps(router, st, server, pending, choose, dep))


async def _glue_steps(router, st, server, pending, choose, dep) -> None:
    from ray.serve._private.common import ReplicaID

    assert await choose(pending(1)) == [["B"], ["C"], ["A"]]  # least-loaded
    # p1's pick of B is pending (not yet sent): queues now tie and C has more free KV
    assert await choose(pending(2)) == [["C"], ["B"], ["A"]]
    st.claim_request("g0", "A", "sess", [])
    assert (await choose(pending(3, session_id="sess")))[0] == ["A"]  # session affinity
    assert router.decisions["session"] == 1 and router.decisions["least-loaded"] == 2
    router.on_request_routed(pending(1), ReplicaID("B", dep), None)
    router.on_request_completed(ReplicaID("C", dep), "i2")
    router.on_request_completed(ReplicaID("A", dep), "i3")
    assert router._pending() == {}
    router.on_replica_actor_died(ReplicaID("A", dep))  # Ray saw A die: skipped here and in Redis
    for _ in range(50):
        if st.route_info(None, None, [], ["A"]).dead == {"A"}:
            break
        await asyncio.sleep(0.02)
    assert st.route_info(None, None, [], ["A"]).dead == {"A"}
    assert "A" not in {c for rank in await choose(pending(4, session_id="sess")) for c in rank}
    assert router.fallback_count == 0

    server.stop()
    try:
        ranks = await choose(pending(5))
        assert len(ranks) == 1 and sorted(ranks[0]) == ["B", "C"]  # power-of-two among the live ones
        assert router.fallback_count == 1
    finally:
        server.start()
    await asyncio.sleep(0.6)  # the router's client retries Redis after retry_after_s
    st.heartbeat(ReplicaLoad("B", pid=1, free_blocks=50, total_blocks=100))
    assert (await choose(pending(6)))[0] == ["B"] and router.fallback_count == 1
    st.close()
