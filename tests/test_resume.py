"""cluster.resume: the failover stream deduper and generate_with_failover's retries."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError

from apar_worker.types import BranchEvent
from cluster.resume import ReplayMismatchError, StreamDeduper, generate_with_failover
from cluster.state import ReplicaLoad


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

    def start(attempt: int, tree):
        async def gen():
            calls.append(attempt)
            yield f"replica-{attempt}"
            yield [_ev(0, [1], "a", created=True)]
            if attempt == 0:
                raise ActorDiedError()
            yield [_ev(0, [2], "b", fin="stop"), "final"]

        return gen()

    async def run():
        return [x async for x in generate_with_failover(start, request_id="rq", state=state, resume=False)]

    items = asyncio.run(run())
    assert calls == [0, 1]
    # the replayed step is dropped (nothing new in it); the replica ids pass through
    assert items[0] == "replica-0" and items[2] == "replica-1" and len(items) == 4
    assert items[1][0].new_token_ids == [1] and items[3][0].new_token_ids == [2] and items[3][1] == "final"
    assert state.route_info(None, None, [], ["dead-rep"]).dead == {"dead-rep"}

    def bad(attempt: int, tree):
        async def gen():
            raise ValueError("bad request")
            yield  # pragma: no cover

        return gen()

    async def run_bad():
        return [x async for x in generate_with_failover(bad)]

    with pytest.raises(ValueError):
        asyncio.run(run_bad())


def test_resumed_retry_gets_the_tree_so_far_and_sends_each_token_once():
    """Resume: the retry starts from the client's tree (child fork positions included) and its
    events are all new; the replayed run of the test above would be dropped instead."""
    trees: list = []

    def start(attempt: int, tree):
        async def gen():
            trees.append(tree)
            if attempt == 0:
                yield [_ev(0, [5, 1], "a", created=True), _ev(1, [], "", created=True, parent=0)]
                yield [_ev(0, [6], "b"), _ev(1, [7], "x", parent=0)]
                raise ActorDiedError()
            yield [_ev(0, [8], "c", fin="stop"), _ev(1, [9], "y", parent=0, fin="stop"), "final"]

        return gen()

    async def run():
        return [x async for x in generate_with_failover(start, request_id="rq")]

    items = asyncio.run(run())
    assert trees[0] is None
    (root, child) = trees[1]
    assert (root.id, root.parent, root.fork_index, root.token_ids) == (0, None, None, [5, 1, 6])
    assert (child.id, child.parent, child.fork_index, child.token_ids) == (1, 0, 1, [7])
    sent: dict[int, list[int]] = {}
    for step in items:
        for e in step:
            if isinstance(e, BranchEvent):
                sent.setdefault(e.branch_id, []).extend(e.new_token_ids)
    assert sent == {0: [5, 1, 6, 8], 1: [7, 9]} and items[-1][-1] == "final"
