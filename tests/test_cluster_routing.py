"""Acceptance 2: with 2 worker replicas and concurrent requests, every branch of a request runs on
one replica (from the replicas' own records in Redis), and a session's second turn, or a request
sharing a long prompt prefix, goes to the replica that holds it and hits its prefix cache."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from cluster_testkit import make_fork_model, start_cluster, stop_cluster, words

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cl = start_cluster(make_fork_model(tmp_path_factory.mktemp("fork-model")), app="routing", replicas=2)
    yield cl
    stop_cluster(cl)


def test_every_branch_of_a_request_runs_on_one_replica(cluster):
    n = 6
    with ThreadPoolExecutor(n) as ex:
        responses = list(
            ex.map(lambda i: cluster.generate(words(i, 24), 40, request_id=f"conc-{i}"), range(n))
        )
    used: set[str] = set()
    forked = 0
    for i, resp in enumerate(responses):
        ran = cluster.state.ran_on(f"conc-{i}")  # written by the replica that decoded each branch
        assert ran is not None and set(ran) == {str(b.id) for b in resp.branches}
        replicas = set().union(*ran.values())
        assert len(replicas) == 1, f"request {i} ran on {replicas}"
        assert replicas == {resp.replica_id}
        progress = cluster.state.progress(f"conc-{i}")
        assert progress["replica"] == resp.replica_id and progress["state"] == resp.finish_reason
        forked += len(resp.branches) > 1
        used |= replicas
    assert forked >= n // 2, "the fork-prone test model should fork in most requests"
    live = set(cluster.state.replica_loads())
    assert used == live and len(live) == 2, "concurrent requests should be spread over both replicas"


def test_follow_ups_go_to_the_replica_that_caches_their_prefix(cluster):
    sessions = 4
    bases = [words(100 + s, 120) for s in range(sessions)]  # long, distinct per session

    def turn1(s: int):
        return cluster.generate(bases[s] + " w5 w6", 12, session_id=f"sess-{s}")

    with ThreadPoolExecutor(sessions) as ex:
        first = list(ex.map(turn1, range(sessions)))
    holders = [r.replica_id for r in first]
    assert len(set(holders)) == 2, "concurrent first turns should use both replicas"
    assert all(cluster.state.session_replica(f"sess-{s}") == holders[s] for s in range(sessions))

    def turn2(s: int):
        prompt = bases[s] + " w5 w6 " + first[s].text + " w9 w10"
        return cluster.generate(prompt, 12, session_id=f"sess-{s}")

    def same_prefix_no_session(s: int):
        return cluster.generate(bases[s] + " w11 w12 w13", 12)

    with ThreadPoolExecutor(sessions) as ex:
        second = list(ex.map(turn2, range(sessions)))
        prefixed = list(ex.map(same_prefix_no_session, range(sessions)))
    for s in range(sessions):
        assert second[s].replica_id == holders[s], f"session {s} moved replicas"
        assert second[s].usage.cached_tokens > 0, f"session {s} second turn missed the prefix cache"
        assert prefixed[s].replica_id == holders[s], f"prefix of session {s} not routed to its holder"
        assert prefixed[s].usage.cached_tokens > 0
