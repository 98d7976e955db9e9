"""cluster.router: the ranking policy (pure) and AparRouter's glue against a real redis-server."""

from __future__ import annotations

import asyncio

from cluster.router import Thresholds, rank_replicas
from cluster.state import ReplicaLoad, RouteInfo, RoutingKeys, SchedulerState


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
    router._state.retry_now()  # as after retry_after_s: the router's client tries Redis again
    st.heartbeat(ReplicaLoad("B", pid=1, free_blocks=50, total_blocks=100))
    assert (await choose(pending(6)))[0] == ["B"] and router.fallback_count == 1
    st.close()
