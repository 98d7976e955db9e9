"""Per-request state: the branch tree, each branch's tokens and KV block table.

A branch's `tokens` is its whole visible context (docs/design.md, "Decoding contract"): the
prompt, the ancestors' tokens through each `[Fork]`, `[Child]`, then its own output.
`num_computed` of them have K/V in the cache (only the KV manager changes it); the rest
(normally one sampled token, or a prompt chunk) are fed next.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from apar_worker.types import FinishReason, GenerateRequest


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Branch:
    id: int
    parent: Branch | None
    depth: int
    tokens: list[int]
    own_start: int  # index in `tokens` where this branch's own output begins
    fork_index: int | None = None  # index of its [Fork] in the parent's output_ids
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the full blocks, in order
    children: dict[int, Branch] = field(default_factory=dict)  # output index of [Fork] -> child
    finish_reason: FinishReason | None = None
    detok: object | None = None  # IncrementalDetokenizer when text is tracked per step
    text: str = ""  # tracked text (only for stream/stop-string requests)
    sent: int = 0  # characters of `text` handed out in events' delta_text so far
    text_cut: bool = False  # a stop string cut `text`: it is final
    generator: object | None = None  # torch.Generator for seeded sampling
    # A re-admitted (preempted or resumed) child whose parent is live again: it computes
    # nothing until the parent's K/V reach this position, then shares them as at its fork.
    wait_for_parent: int | None = None
    # Speculative decoding (apar_worker/speculative.py): steps it fed drafts in, drafts fed,
    # drafts accepted, and a running mean of its acceptance rate (adaptive k).
    spec_steps: int = 0
    spec_drafted: int = 0
    spec_accepted: int = 0
    spec_recent: float = 1.0

    @property
    def output_ids(self) -> list[int]:
        """Tokens this branch produced itself (sampled; a child's forced [Child] excluded)."""
        start = self.own_start + (1 if self.parent is not None else 0)
        return self.tokens[start:]

    def fork_path(self) -> list[int]:
        """The [Fork] indices (each in its parent's output) from the root down to this branch."""
        path, br = [], self
        while br.parent is not None:
            path.append(br.fork_index)
            br = br.parent
        return path[::-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.num_computed


@dataclass(eq=False)
class RequestState:
    request: GenerateRequest
    prompt_ids: list[int]
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    branches: list[Branch] = field(default_factory=list)
    num_generated: int = 0
    cached_tokens: int = 0
    steps: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    error: str | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def root(self) -> Branch:
        return self.branches[0]

    def live_branches(self) -> list[Branch]:
        return [b for b in self.branches if b.finish_reason is None]

    def reserved_blocks(self, expected_forks: int) -> int:
        """Blocks still held back for forks this request is likely to make (admission control)."""
        if not self.request.fork:
            return 0
        expected = min(expected_forks, self.request.max_branches - 1)
        return max(0, expected - (len(self.branches) - 1))
