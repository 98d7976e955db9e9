"""KVManager without a model: admission, copy-on-write, fork sharing, prefix hits, freeing."""

from __future__ import annotations

from kv_utils import child_of, make_state

from apar_worker.kv_manager import KVManager

BS = 4


def assert_all_free(kv: KVManager) -> None:
    assert kv.num_free == kv.num_blocks
    assert all(c == 0 for c in kv.pool.ref_counts)


def admit(kv: KVManager, tokens: list[int], held: int = 0):
    state = make_state(tokens)
    plan = kv.plan_admission(state.live_branches(), 0, held)
    assert plan.fits
    kv.admit(state, plan)
    br = state.root
    assert kv.allocate(br, br.num_pending) == []
    kv.commit(br, br.num_pending)
    return state, br


def test_admission_counts_blocks_reservations_and_what_is_held():
    kv = KVManager(8, BS)
    state = make_state(list(range(10)))  # 10 tokens -> 3 blocks
    plan = kv.plan_admission(state.live_branches(), reserve=2, held=1)
    assert (plan.need, plan.available, plan.fits) == (5, 7, True)
    assert not kv.plan_admission(state.live_branches(), reserve=5, held=1).fits
    kv.admit(state, plan)
    assert kv.num_free == 8 and state.root.num_computed == 0  # admission allocates nothing yet
    assert kv.allocate(state.root, 10) == [] and len(state.root.block_table) == 3
    kv.free_request(state)
    assert_all_free(kv)


def test_allocate_is_all_or_nothing():
    kv = KVManager(2, BS)
    state = make_state(list(range(12)))
    kv.admit(state, kv.plan_admission(state.live_branches(), 0, 0))
    assert kv.allocate(state.root, 12) is None
    assert state.root.block_table == [] and kv.num_free == 2
    assert kv.allocate(state.root, 8) == [] and kv.num_free == 0
    kv.free(state.root)
    assert_all_free(kv)


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    kv = KVManager(16, BS)
    state, parent = admit(kv, list(range(9)))  # 9 tokens: blocks 2 full + 1 partial
    parent.tokens.append(1)  # sampled [Fork] at position 9
    child = child_of(state, parent)
    kv.fork(parent, child, len(parent.tokens) - 1)
    assert child.block_table == parent.block_table and child.num_computed == 9
    assert [kv.pool.ref_counts[b] for b in parent.block_table] == [2, 2, 2]
    assert kv.num_free == 13  # nothing copied yet
    # The parent writes position 9 into the shared partial block: it gets its own copy.
    old = parent.block_table[2]
    copies = kv.allocate(parent, 1)
    assert copies == [(old, parent.block_table[2])] and parent.block_table[2] != old
    assert kv.pool.ref_counts[old] == 1 and child.block_table[2] == old
    # The child writes [Fork]@9 and [Child]@10 into the block it now holds alone: no copy.
    assert kv.allocate(child, 2) == []
    kv.commit(parent, 1)
    kv.commit(child, 2)
    # stored tokens: 8 in the 2 shared full blocks (once), 2 in the parent's copy, 3 in the child's
    assert kv.stored_tokens([state]) == 8 + 2 + 3 and kv.num_blocks - kv.num_free == 4
    kv.free(parent)
    assert kv.num_free < kv.num_blocks
    kv.free(child)
    assert_all_free(kv)
    assert kv.stored_tokens([state]) == 0


def test_fork_at_a_block_boundary_copies_nothing():
    kv = KVManager(8, BS)
    state, parent = admit(kv, list(range(8)))  # 8 tokens: 2 full blocks
    parent.tokens.append(1)  # [Fork] sampled: position 8 starts a new block
    child = child_of(state, parent)
    kv.fork(parent, child, 8)
    assert child.block_table == parent.block_table and child.block_hashes == parent.block_hashes
    assert kv.allocate(parent, 1) == [] and kv.allocate(child, 2) == []
    assert parent.block_table[:2] == child.block_table[:2] and parent.block_table[2] != child.block_table[2]
    assert kv.num_free == 4
    kv.free_request(state)
    assert_all_free(kv)


def test_prefix_hits_revive_freed_blocks_and_count_in_the_hit_rate():
    kv = KVManager(8, BS)
    prompt = list(range(3, 15))  # 12 tokens: 3 full blocks
    first, _ = admit(kv, prompt)
    assert first.cached_tokens == 0 and len(first.root.block_hashes) == 3
    kv.free_request(first)
    assert_all_free(kv)
    again = make_state(prompt + [99])
    plan = kv.plan_admission(again.live_branches(), 0, 0)
    assert [len(h) for h in plan.hits] == [3] and plan.need == 1 and plan.available == 5
    kv.admit(again, plan)
    assert again.cached_tokens == 12 and again.root.num_computed == 12
    assert kv.prefix_hit_rate == 12 / (12 + 13)
    # A prompt equal to the cached blocks keeps its last token to compute.
    same = make_state(prompt)
    assert [len(h) for h in kv.plan_admission(same.live_branches(), 0, 0).hits] == [2]
    kv.free_request(again)
    assert_all_free(kv)


def test_branches_hitting_the_same_cached_blocks_count_them_once():
    """A preempted forked request whose root has ended: both children's contexts start with the
    same cached blocks (a child with a live parent rejoins it instead, see below)."""
    kv = KVManager(8, BS)
    prompt = list(range(3, 15))  # 3 full blocks, cached once freed
    first, _ = admit(kv, prompt)
    kv.free_request(first)
    again = make_state(prompt + [7])
    child_of(again, again.root)
    again.root.tokens += [1]
    child_of(again, again.root)
    again.root.finish_reason = "stop"
    plan = kv.plan_admission(again.live_branches(), 0, 0)
    assert [len(h) for h in plan.hits] == [3, 3]
    # 3 revived blocks leave the free list once: 8 - 3 free, each child needs 1 block of its own
    assert (plan.need, plan.available, plan.fits) == (2, 5, True)


def test_a_child_admitted_with_its_parent_rejoins_its_blocks():
    kv = KVManager(16, BS)
    state = make_state(list(range(3, 13)) + [1])  # 10 prompt tokens and a [Fork] at position 10
    child = child_of(state, state.root)  # context: 11 tokens + [Child]
    child.tokens += [5, 6, 7]
    state.root.tokens += [8, 9]
    plan = kv.plan_admission(state.live_branches(), 0, 0)
    # root: 13 tokens = 4 blocks; child: from its [Fork] at 10, the partly filled block 2 onwards
    assert plan.hits == [[], []] and plan.need == 4 + (4 - 10 // BS)
    kv.admit(state, plan)
    assert child.wait_for_parent == 10 and child.block_table == []
    kv.rejoin(state)
    assert child.wait_for_parent == 10, "nothing to share before the parent computed it"
    assert kv.allocate(state.root, 12) == []
    kv.commit(state.root, 12)
    kv.rejoin(state)
    assert child.wait_for_parent is None and child.num_computed == 10
    assert child.block_table == state.root.block_table[:3]
    assert [kv.pool.ref_counts[b] for b in child.block_table] == [2, 2, 2]
    kv.free_request(state)
    assert_all_free(kv)


def test_prefix_caching_off_never_matches():
    kv = KVManager(8, BS, enable_prefix_caching=False)
    prompt = list(range(3, 15))
    first, _ = admit(kv, prompt)
    kv.free_request(first)
    again = make_state(prompt + [1])
    assert kv.plan_admission(again.live_branches(), 0, 0).hits == [[]]
    assert kv.prefix_hit_rate == 0.0
    assert_all_free(kv)


def test_free_resets_the_branch_for_recompute():
    kv = KVManager(8, BS)
    state, br = admit(kv, list(range(6)))
    kv.free(br)
    assert br.block_table == [] and br.block_hashes == [] and br.num_computed == 0
    assert br.num_pending == 6
    kv.free(br)  # freeing twice is harmless: the table is empty
    assert_all_free(kv)
