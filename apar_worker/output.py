"""A request's result: the answer assembled in reading order, branch summaries, timings.

The one assembly function lives here (docs/design.md, "Decoding contract"): a branch's own text
up to each `[Fork]`, then that child's whole answer, then the branch's text after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from apar_worker.sequence import Branch, RequestState
from apar_worker.types import BranchInfo, RequestOutput

Decode = Callable[[list[int]], str]


def _stop_text(branch: Branch, tracked: bool) -> str | None:
    """The branch's tracked text when it ends there (cut at its stop string), else None."""
    if tracked and branch.finish_reason == "stop" and branch.detok is not None:
        return branch.text
    return None


def assemble(branch: Branch, decode: Decode, tracked: bool = False) -> str:
    """Answer text in reading order. `tracked` (stop-string requests): a branch that stopped
    ends with its tracked text, which is already cut where a stop string matched."""
    out = branch.output_ids
    parts: list[str] = []
    start = 0
    for idx in sorted(branch.children):
        parts.append(decode(out[start:idx]))
        parts.append(assemble(branch.children[idx], decode, tracked))
        start = idx + 1
    full = _stop_text(branch, tracked)
    if full is None:
        parts.append(decode(out[start:]))
    else:
        consumed = len(decode(out[:start])) if start else 0
        parts.append(full[consumed:] if len(full) >= consumed else "")
    return "".join(parts)


def branch_infos(state: RequestState, decode: Decode, tracked: bool = False) -> list[BranchInfo]:
    infos = []
    for b in state.branches:
        text = _stop_text(b, tracked)
        infos.append(
            BranchInfo(
                id=b.id,
                parent=b.parent.id if b.parent is not None else None,
                text=decode(b.output_ids) if text is None else text,
                num_tokens=len(b.output_ids),
                finish_reason=b.finish_reason,
                fork_position=b.fork_index,
                token_ids=list(b.output_ids),
                spec_steps=b.spec_steps,
                spec_drafted=b.spec_drafted,
                spec_accepted=b.spec_accepted,
            )
        )
    return infos


def request_output(state: RequestState, decode: Decode) -> RequestOutput:
    tracked = bool(state.request.sampling.stop)
    end = state.finish_time or time.monotonic()
    return RequestOutput(
        request_id=state.request_id,
        text=assemble(state.root, decode, tracked),
        branches=branch_infos(state, decode, tracked),
        finish_reason=state.finish_reason or "stop",
        prompt_tokens=len(state.prompt_ids),
        num_tokens=state.num_generated,
        steps=state.steps,
        cached_tokens=state.cached_tokens,
        ttft_s=(state.first_token_time - state.arrival_time) if state.first_token_time else None,
        latency_s=end - state.arrival_time,
        error=state.error,
        num_preemptions=state.num_preemptions,
    )
