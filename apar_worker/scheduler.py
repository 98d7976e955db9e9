"""Iteration-level scheduler: which branches feed which tokens in the next engine step.

Every step takes the pending tokens of all running branches (decode tokens first, then
prefill chunks) and then admits waiting requests FCFS, all under one token budget. A branch
may feed any number of tokens (prefill chunks, recompute, speculative drafts later). When the
pool runs dry the most recently admitted request is preempted whole (all its branches) and
recomputed later; admission keeps room for the forks running requests are expected to make.
Where the K/V of a scheduled token go is the KV manager's business (docs/design.md,
"Scheduling contract").
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from apar_worker.attention import MAX_BATCHED_QUERY
from apar_worker.kv_manager import KVManager
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
    num_tokens: int  # fed this step, drafts included
    sample: bool  # the chunk reaches the branch's last token, so a new token is sampled
    draft: list[int] = field(default_factory=list)  # speculative tokens fed after the last one

    @property
    def num_committed(self) -> int:
        """Tokens whose K/V are valid once the step ran (drafts count only when accepted)."""
        return self.num_tokens - len(self.draft)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledBranch] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks
    rejected: list[tuple[RequestState, str]] = field(default_factory=list)  # can never fit
    preempted: list[RequestState] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def requests(self) -> list[RequestState]:
        """The scheduled requests, each once, in order."""
        return list({id(s.request): s.request for s in self.scheduled}.values())


@dataclass
class _Batch:
    """The step being built: the budget left, scheduled chunks and copies per branch."""

    budget: int
    chunks: dict[int, ScheduledBranch] = field(default_factory=dict)  # id(branch) -> chunk
    copies: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    out: SchedulerOutput = field(default_factory=SchedulerOutput)

    def add(
        self, state: RequestState, br: Branch, n: int, copies: list[tuple[int, int]], draft: list[int]
    ) -> None:
        total = n + len(draft)
        self.chunks[id(br)] = ScheduledBranch(state, br, br.num_computed, total, n == br.num_pending, draft)
        if copies:
            self.copies[id(br)] = copies
        self.budget -= total

    def drop(self, state: RequestState) -> None:
        for br in state.branches:
            self.chunks.pop(id(br), None)
            self.copies.pop(id(br), None)

    def finish(self) -> SchedulerOutput:
        self.out.scheduled = list(self.chunks.values())
        self.out.copies = [pair for pairs in self.copies.values() for pair in pairs]
        return self.out


class Scheduler:
    def __init__(self, kv: KVManager, config: SchedulerConfig) -> None:
        self.kv = kv
        self.config = config
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------------------

    def add(self, state: RequestState) -> None:
        self.waiting.append(state)

    def remove(self, state: RequestState) -> None:
        """Drop a finished/aborted request from the queues and return all its blocks."""
        if state in self.running:
            self.running.remove(state)
        elif state in self.waiting:
            self.waiting.remove(state)
        state.status = RequestStatus.FINISHED
        self.kv.free_request(state)

    def num_running_branches(self) -> int:
        return sum(len(s.live_branches()) for s in self.running)

    # ---- one step -----------------------------------------------------------------------

    def schedule(self, drafts: dict[int, list[int]] | None = None) -> SchedulerOutput:
        """`drafts`: id(branch) -> speculative tokens a decoding branch may feed after its
        pending ones (dropped when the budget or the pool has no room for them)."""
        batch = _Batch(self.config.max_num_batched_tokens)
        drafts = drafts or {}
        # Decode-like branches first so a long prefill never stalls running streams.
        for short in (True, False):
            i = 0
            while i < len(self.running) and batch.budget > 0:
                if self._schedule_running(self.running[i], batch, short, drafts):
                    i += 1  # else it was preempted: running[i] is the next request now
        self._admit(batch)
        return batch.finish()

    def update_from_output(self, out: SchedulerOutput) -> None:
        """The step ran: the scheduled tokens are in the cache now."""
        for state in out.requests:
            state.steps += 1
        for sb in out.scheduled:
            self.kv.commit(sb.branch, sb.num_committed)

    def _schedule_running(
        self, state: RequestState, batch: _Batch, short: bool, drafts: dict[int, list[int]]
    ) -> bool:
        """Schedule the pending tokens of one running request's branches of one kind (short:
        at most MAX_BATCHED_QUERY tokens); False if the request itself had to be preempted."""
        self.kv.rejoin(state)
        hold = _holds_back(state)
        for br in state.live_branches():
            if batch.budget == 0:
                break
            if id(br) in batch.chunks or br.num_pending == 0 or br.wait_for_parent is not None:
                continue
            if short != (br.num_pending <= MAX_BATCHED_QUERY):
                continue
            n = min(br.num_pending - hold, batch.budget)
            if n <= 0:
                continue
            draft = _fitting_draft(drafts.get(id(br), []), br, n, batch.budget)
            copies = self.kv.allocate(br, n + len(draft))
            if copies is None and draft:  # no room for drafts: plain decoding first
                draft = []
                copies = self.kv.allocate(br, n)
            while copies is None:  # out of blocks: preempt the newest request, then try again
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is state:
                    return False
                copies = self.kv.allocate(br, n)
            batch.add(state, br, n, copies, draft)
        return True

    def _admit(self, batch: _Batch) -> None:
        """FCFS admission while the budget, the branch limit and the free blocks allow."""
        cfg = self.config
        while self.waiting and batch.budget > 0 and not batch.out.preempted:
            state = self.waiting[0]
            live = state.live_branches()
            if self.running and self.num_running_branches() + len(live) > cfg.max_num_seqs:
                break
            held = sum(s.reserved_blocks(cfg.expected_forks) for s in self.running)
            plan = self.kv.plan_admission(
                live, state.reserved_blocks(cfg.expected_forks), held + cfg.watermark_blocks
            )
            # Alone in the engine, a request's fork reservation is a wish, not a need.
            if not plan.fits and not (not self.running and plan.fits_without_reserve):
                if not self.running:
                    self.waiting.popleft()
                    msg = f"request needs {plan.need - plan.reserve + plan.revived} KV blocks, the pool has {self.kv.num_blocks}"
                    batch.out.rejected.append((state, msg))
                    continue
                break
            self.waiting.popleft()
            state.status = RequestStatus.RUNNING
            self.running.append(state)
            self.kv.admit(state, plan)
            self.kv.rejoin(state)
            hold = _holds_back(state)
            for br in live:
                if batch.budget == 0:
                    break
                n = min(br.num_pending - hold, batch.budget)
                if br.wait_for_parent is not None or n <= 0:
                    continue
                copies = self.kv.allocate(br, n)
                if copies is None:  # cannot happen after the plan fitted
                    raise RuntimeError("admission check passed but blocks ran out")
                batch.add(state, br, n, copies, [])

    def _preempt(self, state: RequestState, batch: _Batch) -> None:
        """Free every block of the request and queue it first, to be recomputed (vLLM's policy)."""
        self.running.remove(state)
        batch.drop(state)
        self.kv.free_request(state)
        state.status = RequestStatus.WAITING
        state.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(state)
        batch.out.preempted.append(state)


def _fitting_draft(draft: list[int], br: Branch, n: int, budget: int) -> list[int]:
    """The part of a branch's drafts that fits this step: only after its whole pending chunk,
    within the token budget, and short enough to stay in the batched decode attention."""
    if not draft or n != br.num_pending:
        return []
    return draft[: max(0, min(budget - n, MAX_BATCHED_QUERY - n))]


def _holds_back(state: RequestState) -> int:
    """1 while some branch of the request waits to rejoin its parent: the others then stop short
    of their last token, so every branch samples its next token in the same step, as if the
    request had never been preempted (the shared max_tokens budget ends it the same way)."""
    return int(any(br.wait_for_parent is not None for br in state.live_branches()))
