"""Acceptance 2 on the shared 2-replica cluster: every branch of a request runs on one replica
(from the replicas' own records in Redis, not the router's intent), and a session's second turn,
or a request sharing a long prompt prefix, goes to the replica that holds it and hits its prefix
cache."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from cluster_testkit import Client, ask, long_system

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def client(apar_cluster):
    apar_cluster.wait_replicas(2, timeout_s=180)  # another test may have killed one
    c = Client(apar_cluster.address)
    yield c
    c.close()


def test_every_branch_of_a_request_runs_on_one_replica(apar_cluster, client):
    n = 6
    ids = [f"conc-{uuid.uuid4().hex[:8]}-{i}" for i in range(n)]
    with ThreadPoolExecutor(n) as ex:
        responses = list(ex.map(lambda i: client.generate(ask(i), 160, request_id=ids[i]), range(n)))
    used: set[str] = set()
    forked = 0
    for rid, resp in zip(ids, responses, strict=True):
        ran = apar_cluster.state.ran_on(rid)  # written by the replica that decoded each branch
        assert ran is not None and set(ran) == {str(b.id) for b in resp.branches}
        replicas = set().union(*ran.values())
        assert len(replicas) == 1, f"{rid} ran on {replicas}"
        assert replicas == {resp.replica_id}
        progress = apar_cluster.state.progress(rid)
        assert progress["replica"] == resp.replica_id and progress["state"] == resp.finish_reason
        forked += len(resp.branches) > 1
        used |= replicas
    assert forked >= 1, "no request forked: nothing to keep together"
    live = set(apar_cluster.state.replica_loads())
    assert used == live and len(live) == 2, "concurrent requests should be spread over both replicas"


def test_follow_ups_go_to_the_replica_that_caches_their_prefix(apar_cluster, client):
    sessions = 4
    tag = uuid.uuid4().int % 1000
    sids = [f"sess-{tag}-{s}" for s in range(sessions)]
    systems = [long_system(tag * 10 + s) for s in range(sessions)]

    def turn1(s: int):
        return client.generate([("system", systems[s]), *ask(s)], 16, session_id=sids[s])

    with ThreadPoolExecutor(sessions) as ex:
        first = list(ex.map(turn1, range(sessions)))
    holders = [r.replica_id for r in first]
    assert len(set(holders)) == 2, "concurrent first turns should use both replicas"
    assert [apar_cluster.state.session_replica(s) for s in sids] == holders

    def turn2(s: int):
        history = [("system", systems[s]), *ask(s), ("assistant", first[s].text), ("user", "Tell me more.")]
        return client.generate(history, 16, session_id=sids[s])

    def same_prefix_no_session(s: int):
        return client.generate([("system", systems[s]), ("user", "Something else?")], 16)

    with ThreadPoolExecutor(sessions) as ex:
        second = list(ex.map(turn2, range(sessions)))
        prefixed = list(ex.map(same_prefix_no_session, range(sessions)))
    for s in range(sessions):
        assert second[s].replica_id == holders[s], f"session {s} moved replicas"
        assert second[s].usage.cached_tokens > 0, f"session {s} second turn missed the prefix cache"
        assert prefixed[s].replica_id == holders[s], f"prefix of session {s} not routed to its holder"
        assert prefixed[s].usage.cached_tokens > 0
