"""Iteration-level scheduler: which branches feed which tokens in the next engine step.

Every step takes the pending tokens of all running branches (decode tokens first, then
prefill chunks) and then admits waiting requests FCFS, all under one token budget. A branch
may feed any number of tokens (prefill chunks, recompute, speculative drafts later). When the
pool runs dry the most recently admitted request is preempted whole (all its branches) and
recomputed later; admission keeps room for the forks running requests are expected to make.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from apar_worker.kv_cache import BlockPool, chain_hash
from apar_worker.sequence import Branch, RequestState, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 1024
    max_num_seqs: int = 128
    expected_forks: int = 4  # blocks held back per running APAR request for forks (CoW + first block)
    watermark_blocks: int = 1  # never admit into the last blocks of the pool


@dataclass
class ScheduledBranch:
    request: RequestState
    branch: Branch
    start: int  # first position fed this step (== branch.num_computed when scheduled)
    num_tokens: int
    sample: bool  # the chunk reaches the branch's last token, so a new token is sampled


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledBranch] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks
    rejected: list[tuple[RequestState, str]] = field(default_factory=list)  # can never fit
    preempted: list[RequestState] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, pool: BlockPool, config: SchedulerConfig) -> None:
        self.pool = pool
        self.config = config
        self.block_size = pool.block_size
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.num_preemptions = 0
        self.prompt_tokens_seen = 0
        self.prompt_tokens_cached = 0

    # ---- queue management -------------------------------------------------------------

    def add(self, state: RequestState) -> None:
        self.waiting.append(state)

    def remove(self, state: RequestState) -> None:
        """Drop a finished/aborted request from the queues and return all its blocks."""
        if state in self.running:
            self.running.remove(state)
        elif state in self.waiting:
            self.waiting.remove(state)
        self.free_request(state)

    def free_request(self, state: RequestState) -> None:
        for br in state.branches:
            self.free_branch(br)

    def free_branch(self, br: Branch) -> None:
        self.pool.free_table(br.block_table)
        br.block_hashes = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        per_branch: dict[int, ScheduledBranch] = {}
        copies: dict[int, list[tuple[int, int]]] = {}
        # Decode-like branches first so a long prefill never stalls running streams.
        for short_pass in (True, False):
            i = 0
            while i < len(self.running) and budget > 0:
                state = self.running[i]
                preempted_self = False
                for br in state.live_branches():
                    if id(br) in per_branch or br.num_pending == 0:
                        continue
                    if short_pass != (br.num_pending <= 8):
                        continue
                    n = min(br.num_pending, budget)
                    while not self._reserve(br, n, copies):
                        victim = self.running[-1]
                        self._preempt(victim, per_branch, copies, out)
                        if victim is state:
                            preempted_self = True
                            break
                    if preempted_self:
                        break
                    per_branch[id(br)] = ScheduledBranch(state, br, br.num_computed, n, n == br.num_pending)
                    budget -= n
                    if budget == 0:
                        break
                if not preempted_self:
                    i += 1
        budget = self._admit(budget, per_branch, copies, out)
        out.scheduled = list(per_branch.values())
        out.copies = [pair for pairs in copies.values() for pair in pairs]
        return out

    def _admit(self, budget: int, per_branch: dict, copies: dict, out: SchedulerOutput) -> int:
        cfg = self.config
        while self.waiting and budget > 0 and not out.preempted:
            state = self.waiting[0]
            live = state.live_branches()
            if (
                sum(len(s.live_branches()) for s in self.running) + len(live) > cfg.max_num_seqs
                and self.running
            ):
                break
            hits = {id(br): self._match_prefix(br) for br in live}
            need = sum(
                -(-len(br.tokens) // self.block_size) - len(hits[id(br)]) for br in live
            ) + state.reserved_blocks(cfg.expected_forks)
            held = sum(s.reserved_blocks(cfg.expected_forks) for s in self.running)
            revived = sum(1 for h in hits.values() for b in h if self.pool.ref_counts[b] == 0)
            available = self.pool.num_free - revived - held - cfg.watermark_blocks
            if need > available:
                if not self.running and need > self.pool.num_blocks - cfg.watermark_blocks:
                    self.waiting.popleft()
                    out.rejected.append(
                        (state, f"request needs {need} KV blocks, the pool has {self.pool.num_blocks}")
                    )
                    continue
                break
            self.waiting.popleft()
            state.status = RequestStatus.RUNNING
            self.running.append(state)
            for br in live:
                table = hits[id(br)]
                for b in table:
                    self.pool.incref(b)
                br.block_table = list(table)
                br.num_computed = len(table) * self.block_size
                br.update_block_hashes(self.block_size)
                if br.parent is None and state.num_preemptions == 0:
                    state.cached_tokens = br.num_computed
                    self.prompt_tokens_seen += len(br.tokens)
                    self.prompt_tokens_cached += br.num_computed
                if budget == 0:
                    continue
                n = min(br.num_pending, budget)
                if not self._reserve(br, n, copies):  # cannot happen after the check above
                    raise RuntimeError("admission check passed but blocks ran out")
                per_branch[id(br)] = ScheduledBranch(state, br, br.num_computed, n, n == br.num_pending)
                budget -= n
        return budget

    def _match_prefix(self, br: Branch) -> list[int]:
        """Cached full blocks of this branch's context; at least one token is left to compute."""
        if not self.pool.enable_prefix_caching:
            return []
        blocks: list[int] = []
        prev: int | None = None
        for i in range((len(br.tokens) - 1) // self.block_size):
            prev = chain_hash(prev, br.tokens[i * self.block_size : (i + 1) * self.block_size])
            block = self.pool.lookup(prev)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _reserve(self, br: Branch, n: int, copies: dict[int, list[tuple[int, int]]]) -> bool:
        """Make room for positions [num_computed, num_computed + n): new blocks and CoW."""
        bs = self.block_size
        start = br.num_computed
        need_new = max(0, -(-(start + n) // bs) - len(br.block_table))
        idx = start // bs
        cow = start % bs != 0 and self.pool.ref_counts[br.block_table[idx]] > 1
        if self.pool.num_free < need_new + int(cow):
            return False
        if cow:
            old = br.block_table[idx]
            new = self.pool.allocate()
            self.pool.decref(old)
            br.block_table[idx] = new
            copies.setdefault(id(br), []).append((old, new))
        for _ in range(need_new):
            br.block_table.append(self.pool.allocate())
        return True

    def _preempt(self, state: RequestState, per_branch: dict, copies: dict, out: SchedulerOutput) -> None:
        self.running.remove(state)
        for br in state.branches:
            per_branch.pop(id(br), None)
            copies.pop(id(br), None)
            self.free_branch(br)
            br.num_computed = 0
        state.status = RequestStatus.WAITING
        state.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(state)
        out.preempted.append(state)
