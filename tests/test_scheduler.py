"""Scheduler without a model: token budget, decode first, preemption order, FCFS fairness."""

from __future__ import annotations

from kv_utils import make_state

from apar_worker.attention import MAX_BATCHED_QUERY
from apar_worker.kv_manager import KVManager
from apar_worker.scheduler import Scheduler, SchedulerConfig
from apar_worker.sequence import RequestStatus

BS = 4


def make(num_blocks: int, budget: int = 64, max_num_seqs: int = 128, expected_forks: int = 4) -> Scheduler:
    cfg = SchedulerConfig(
        max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, expected_forks=expected_forks
    )
    return Scheduler(KVManager(num_blocks, BS), cfg)


def run_step(sched: Scheduler, token: int = 7):
    """One engine step without a model: schedule, commit, append a token to every sampling row."""
    out = sched.schedule()
    sched.update_from_output(out)
    for sb in out.scheduled:
        if sb.sample:
            sb.branch.tokens.append(token)
    return out


def plan(out) -> list[tuple[str, int]]:
    return [(sb.request.request_id, sb.num_tokens) for sb in out.scheduled]


def add(sched: Scheduler, rid: str, n: int, fork: bool = False):
    base = 1000 * (1 + sum(map(ord, rid)))  # distinct prompts: no prefix-cache hits between them
    state = make_state(list(range(base, base + n)), fork=fork)
    state.request.request_id = rid
    sched.add(state)
    return state


def test_prefill_is_chunked_to_the_token_budget():
    sched = make(32, budget=6)
    a = add(sched, "a", 10)
    b = add(sched, "b", 3)
    out = run_step(sched)
    assert plan(out) == [("a", 6)] and not out.scheduled[0].sample and out.num_tokens == 6
    out = run_step(sched)  # a's last 4 prompt tokens, then b is admitted into the budget left
    assert plan(out) == [("a", 4), ("b", 2)] and [sb.sample for sb in out.scheduled] == [True, False]
    assert a.status is b.status is RequestStatus.RUNNING and a.steps == 2 and b.steps == 1
    out = run_step(sched)
    assert plan(out) == [("a", 1), ("b", 1)]


def test_decode_tokens_go_before_long_chunks():
    sched = make(64, budget=10)
    a, _b = add(sched, "a", 4), add(sched, "b", 4)
    run_step(sched)
    a.root.tokens.extend(range(3, 33))  # a has a long chunk to (re)compute, b one decode token
    out = run_step(sched)
    assert plan(out) == [("b", 1), ("a", 9)]
    assert len(a.root.tokens) - a.root.num_computed > MAX_BATCHED_QUERY


def test_out_of_blocks_preempts_the_newest_request_first():
    sched = make(7)
    a, _b, c = add(sched, "a", 8), add(sched, "b", 8), add(sched, "c", 8)
    run_step(sched)
    assert [s.request_id for s in sched.running] == ["a", "b", "c"] and sched.kv.num_free == 1
    out = run_step(sched)  # every branch needs a third block; one is free
    assert plan(out) == [("a", 1), ("b", 1)] and out.preempted == [c]
    assert c.status is RequestStatus.WAITING and c.num_preemptions == 1 and c.root.num_computed == 0
    assert list(sched.waiting) == [c] and sched.num_preemptions == 1
    sched.remove(a)
    out = run_step(sched)  # a's blocks came back: c is recomputed, prompt and its token together,
    # from its own first block, still in the prefix cache (its tail block went to b: freed first)
    assert plan(out) == [("b", 1), ("c", 5)] and c.status is RequestStatus.RUNNING


def test_a_request_that_cannot_grow_preempts_itself():
    sched = make(5)
    _a, b = add(sched, "a", 8), add(sched, "b", 8)
    run_step(sched)
    out = run_step(sched)
    assert plan(out) == [("a", 1)] and out.preempted == [b] and sched.waiting[0] is b


def test_preempted_requests_go_before_new_ones():
    sched = make(7)
    _a, _b, c = add(sched, "a", 8), add(sched, "b", 8), add(sched, "c", 8)
    run_step(sched)
    run_step(sched)  # c preempted
    d = add(sched, "d", 2)
    assert list(sched.waiting) == [c, d]


def test_admission_is_first_come_first_served():
    sched = make(4)
    a = add(sched, "a", 8)  # 2 blocks; 4 - 2 - watermark 1 = 1 left for the others
    run_step(sched)
    b, c = add(sched, "b", 8), add(sched, "c", 2)
    out = run_step(sched)
    assert plan(out) == [("a", 1)]  # b does not fit, and c (which would) does not overtake it
    assert list(sched.waiting) == [b, c]
    sched.remove(a)
    assert plan(run_step(sched)) == [("b", 8), ("c", 2)]


def test_a_request_larger_than_the_pool_is_rejected_not_queued_forever():
    sched = make(4)
    _big, _small = add(sched, "big", 20), add(sched, "small", 2)
    out = run_step(sched)
    assert [s.request_id for s, _ in out.rejected] == ["big"] and "needs 5 KV blocks" in out.rejected[0][1]
    assert plan(out) == [("small", 2)]


def test_fork_reservations_hold_blocks_back_from_admission():
    sched = make(8, expected_forks=3)
    add(sched, "a", 4, fork=True)  # 1 block + 3 held back for its forks
    run_step(sched)
    add(sched, "b", 8)  # needs 2: 7 free - 3 held - 1 watermark = 3
    c = add(sched, "c", 8)  # needs 2: 5 free - 3 held - 1 watermark = 1, so it waits
    out = run_step(sched)
    assert plan(out) == [("a", 1), ("b", 8)] and list(sched.waiting) == [c]


def test_max_num_seqs_bounds_the_running_branches():
    sched = make(32, max_num_seqs=2)
    for rid in "abc":
        add(sched, rid, 2)
    assert plan(run_step(sched)) == [("a", 2), ("b", 2)]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_every_block_comes_back_after_remove():
    sched = make(7)
    states = [add(sched, rid, 8) for rid in "abc"]
    for _ in range(3):
        run_step(sched)
    for s in states:
        sched.remove(s)
        assert s.status is RequestStatus.FINISHED
    assert sched.kv.num_free == sched.kv.num_blocks and not sched.running and not sched.waiting


def test_a_request_alone_is_admitted_when_only_its_fork_reservation_does_not_fit():
    sched = make(4, expected_forks=4)  # 3 usable blocks (watermark 1); prompt 2 blocks + 4 held back
    a = add(sched, "a", 8, fork=True)
    out = run_step(sched)
    assert plan(out) == [("a", 8)] and not out.rejected and a.status is RequestStatus.RUNNING
    # ... but one that cannot fit even without its reservation is rejected, with the real need
    sched = make(4, expected_forks=4)
    add(sched, "b", 13, fork=True)
    out = run_step(sched)
    assert [msg for _, msg in out.rejected] == ["request needs 4 KV blocks, the pool has 4"]
