"""Resume, not replay: rebuild a request's branch tree from tokens another replica produced.

The rebuilt request is exactly a preempted one (docs/design.md, "Scheduling contract"): every
branch has its whole context and no K/V; admission prefills them, each child rejoining its
parent's blocks, and decoding continues from each branch's last token. Branches that had ended
stay ended. Greedy decoding continues as if nothing happened; with sampling the continuation is
a fresh draw (per-branch generators restart), never a repeat of tokens already sent.
"""

from __future__ import annotations

from collections.abc import Callable

from apar_worker.apar_rules import held_back
from apar_worker.sequence import Branch, RequestState
from apar_worker.types import InvalidRequestError, ResumedBranch


def rebuild_tree(
    state: RequestState,
    resume: list[ResumedBranch],
    fork_id: int | None,
    child_id: int | None,
    init_branch: Callable[[RequestState, Branch], None],
) -> None:
    """Append the resumed branches to `state` (which has none yet), ids in order 0..n-1."""
    if not resume or resume[0].parent is not None:
        raise InvalidRequestError("resume: the first branch must be the root")
    prompt = state.prompt_ids
    for i, rb in enumerate(resume):
        if rb.id != i:
            raise InvalidRequestError(f"resume: branch ids must be 0..n-1 in order, got {rb.id} at {i}")
        if rb.parent is None:
            br = Branch(id=0, parent=None, depth=0, tokens=prompt + list(rb.token_ids), own_start=len(prompt))
        else:
            br = _child(state, rb, fork_id, child_id)
        br.finish_reason = rb.finish_reason
        init_branch(state, br)
        if br.detok is not None:  # the text so far, so deltas and stop strings continue from it
            for tok in rb.token_ids:
                br.text += br.detok.add(tok)
            # what the client has of it: all but what a stop string may still begin in
            br.sent = max(0, len(br.text) - held_back(state.request.sampling.stop))
        state.num_generated += len(rb.token_ids)


def _child(state: RequestState, rb: ResumedBranch, fork_id: int | None, child_id: int | None) -> Branch:
    if rb.parent is None or not 0 <= rb.parent < len(state.branches) or child_id is None:
        raise InvalidRequestError(f"resume: branch {rb.id} has no valid parent")
    parent = state.branches[rb.parent]
    out = parent.output_ids
    if rb.fork_index is None or not 0 <= rb.fork_index < len(out) or out[rb.fork_index] != fork_id:
        raise InvalidRequestError(f"resume: branch {rb.id} does not start at a [Fork] of its parent")
    fork_pos = len(parent.tokens) - len(out) + rb.fork_index  # the [Fork] in the parent's context
    br = Branch(
        id=rb.id,
        parent=parent,
        depth=parent.depth + 1,
        tokens=parent.tokens[: fork_pos + 1] + [child_id] + list(rb.token_ids),
        own_start=fork_pos + 1,
        fork_index=rb.fork_index,
    )
    parent.children[rb.fork_index] = br
    return br


def resumed_tree(branches: list[Branch]) -> list[ResumedBranch]:
    """The inverse of `rebuild_tree` for a live request (tests; a replica handing over)."""
    return [
        ResumedBranch(
            b.id, b.parent.id if b.parent else None, b.fork_index, list(b.output_ids), b.finish_reason
        )
        for b in branches
    ]
