"""KV block bookkeeping of every branch: the one owner of the block pool.

The scheduler decides *who* runs; this module decides *where their K/V live*. It alone
changes block tables, reference counts and `Branch.num_computed`, matches prompt prefixes
against the prefix cache, registers full blocks by hash, shares a parent's blocks with a
forked child, makes the copy-on-write copies, and frees blocks (docs/design.md, "KV cache
contract"). The shape follows nano-vllm's block manager and vLLM v1's KV cache manager:
the scheduler asks `plan_admission` / `admit` / `allocate` / `fork` / `free`.
"""

from __future__ import annotations

from dataclasses import dataclass

from apar_worker.kv_cache import BlockPool, chain_hash
from apar_worker.sequence import Branch, RequestState


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rejoin_point(br: Branch, live: set[int]) -> int | None:
    """Where a child admitted together with its parent (ids in `live`) shares the parent's K/V
    up to: its [Fork] position. None for a root, or a child whose parent has ended."""
    if br.parent is None or id(br.parent) not in live:
        return None
    return br.own_start - 1


@dataclass
class AdmissionPlan:
    """What admitting one waiting request would take, computed before anything changes."""

    branches: list[Branch]
    hits: list[list[int]]  # per branch: cached blocks of its context (prefix-cache hits)
    need: int  # blocks it needs now, the blocks held back for its forks included
    available: int  # free blocks once revived hits and everyone's reservations are counted
    reserve: int = 0  # of `need`, the blocks held back for its forks
    revived: int = 0  # cached blocks it takes off the free list, on top of `need`

    @property
    def fits(self) -> bool:
        return self.need <= self.available

    @property
    def fits_without_reserve(self) -> bool:
        return self.need - self.reserve <= self.available


class KVManager:
    """Block tables, reference counts, copy-on-write, prefix cache and fork sharing."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.block_size = block_size
        self.prompt_tokens_seen = 0  # prompt tokens of first admissions
        self.prompt_tokens_cached = 0  # ... of which served from the prefix cache

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def prefix_hit_rate(self) -> float:
        seen = self.prompt_tokens_seen
        return self.prompt_tokens_cached / seen if seen else 0.0

    # ---- admission ----------------------------------------------------------------------

    def match_prefix(self, br: Branch) -> list[int]:
        """Cached full blocks of this branch's context; at least one token is left to compute."""
        if not self.pool.enable_prefix_caching:
            return []
        bs = self.block_size
        blocks: list[int] = []
        prev: int | None = None
        for i in range((len(br.tokens) - 1) // bs):
            prev = chain_hash(prev, br.tokens[i * bs : (i + 1) * bs])
            block = self.pool.lookup(prev)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def plan_admission(self, branches: list[Branch], reserve: int, held: int) -> AdmissionPlan:
        """Blocks needed to admit `branches` plus `reserve` for their forks, against what is free
        after `held` blocks are kept back (other requests' fork reservations, the watermark).

        A child admitted with its live parent shares the parent's blocks up to its [Fork] again
        (`rejoin_point`): it needs only the blocks from there on, the partly filled one included.
        """
        bs = self.block_size
        live = {id(br) for br in branches}
        need, hits = reserve, []
        for br in branches:
            at = rejoin_point(br, live)
            hits.append([] if at is not None else self.match_prefix(br))
            need += _cdiv(len(br.tokens), bs) - (at // bs if at is not None else len(hits[-1]))
        # a free cached block that several branches hit (a preempted request's shared prefix)
        # leaves the free list once
        revived = len({b for h in hits for b in h if self.pool.ref_counts[b] == 0})
        return AdmissionPlan(branches, hits, need, self.pool.num_free - revived - held, reserve, revived)

    def admit(self, state: RequestState, plan: AdmissionPlan) -> None:
        """Take the plan's cached blocks; the rest of each context is computed from there (a
        rejoining child waits for its parent's K/V instead)."""
        live = {id(br) for br in plan.branches}
        for br, hits in zip(plan.branches, plan.hits, strict=True):
            br.wait_for_parent = rejoin_point(br, live)
            for block in hits:
                self.pool.incref(block)
            br.block_table = list(hits)
            br.num_computed = len(hits) * self.block_size
            self._hash_full_blocks(br)
            if br.parent is None and state.num_preemptions == 0:
                state.cached_tokens = br.num_computed
                self.prompt_tokens_seen += len(br.tokens)
                self.prompt_tokens_cached += br.num_computed

    # ---- one step -----------------------------------------------------------------------

    def allocate(self, br: Branch, n: int) -> list[tuple[int, int]] | None:
        """Room for positions [num_computed, num_computed + n): new blocks, and a private copy
        of a shared partly filled block. Returns the (src, dst) copies, or None (nothing
        changed) when the pool has too few free blocks."""
        bs = self.block_size
        start = br.num_computed
        need_new = max(0, _cdiv(start + n, bs) - len(br.block_table))
        idx = start // bs
        cow = start % bs != 0 and self.pool.ref_counts[br.block_table[idx]] > 1
        if self.pool.num_free < need_new + int(cow):
            return None
        copies: list[tuple[int, int]] = []
        if cow:
            old = br.block_table[idx]
            new = self.pool.allocate()
            self.pool.decref(old)
            br.block_table[idx] = new
            copies.append((old, new))
        for _ in range(need_new):
            br.block_table.append(self.pool.allocate())
        return copies

    def commit(self, br: Branch, n: int) -> None:
        """`n` more tokens of `br` have K/V in the cache now; newly full blocks join the prefix cache."""
        br.num_computed += n
        for block, h in self._hash_full_blocks(br):
            self.pool.register(block, h)

    def trim(self, br: Branch) -> None:
        """Release the blocks past the branch's computed tokens: those a step allocated for
        speculative drafts that were rejected (private, never hashed, so they go free)."""
        keep = _cdiv(br.num_computed, self.block_size)
        self.pool.free_table(br.block_table[keep:])
        del br.block_table[keep:]

    def rejoin(self, state: RequestState) -> None:
        """Waiting children whose parent has computed their shared prefix take it (after commit)."""
        for br in state.live_branches():
            at = br.wait_for_parent
            if at is not None and br.parent is not None and br.parent.num_computed >= at:
                self.fork(br.parent, br, at)
                br.wait_for_parent = None

    def fork(self, parent: Branch, child: Branch, position: int) -> None:
        """The child shares the parent's computed blocks through `position` (exclusive)."""
        n = min(position, parent.num_computed)
        shared = parent.block_table[: _cdiv(n, self.block_size)]
        for block in shared:
            self.pool.incref(block)
        child.block_table = list(shared)
        child.num_computed = n
        child.block_hashes = parent.block_hashes[: n // self.block_size]

    def free(self, br: Branch) -> None:
        """Drop the branch's references; its K/V must be recomputed if it runs again."""
        self.pool.free_table(br.block_table)
        br.block_hashes = []
        br.num_computed = 0

    def stored_tokens(self, states) -> int:
        """Token slots of the pool holding K/V now (a shared block counted once): with the
        blocks in use, the fragmentation ratio = allocated slots / stored tokens."""
        fill: dict[int, int] = {}
        bs = self.block_size
        for state in states:
            for br in state.branches:
                for i, block in enumerate(br.block_table):
                    n = max(0, min(bs, br.num_computed - i * bs))
                    fill[block] = max(fill.get(block, 0), n)
        return sum(fill.values())

    def free_request(self, state: RequestState) -> None:
        for br in state.branches:
            self.free(br)

    def _hash_full_blocks(self, br: Branch) -> list[tuple[int, int]]:
        """Hash the branch's blocks that became full; returns the (block, hash) pairs."""
        bs = self.block_size
        new = []
        while len(br.block_hashes) < br.num_computed // bs:
            i = len(br.block_hashes)
            prev = br.block_hashes[-1] if br.block_hashes else None
            h = chain_hash(prev, br.tokens[i * bs : (i + 1) * bs])
            br.block_hashes.append(h)
            new.append((br.block_table[i], h))
        return new
