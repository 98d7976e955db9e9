"""Requests and branches without a model, for the KV manager and scheduler unit tests."""

from __future__ import annotations

from apar_worker.sequence import Branch, RequestState
from apar_worker.types import GenerateRequest


def make_state(tokens: list[int], fork: bool = True, max_branches: int = 32) -> RequestState:
    req = GenerateRequest(prompt_token_ids=list(tokens), fork=fork, max_branches=max_branches)
    state = RequestState(req, list(tokens))
    state.branches.append(Branch(id=0, parent=None, depth=0, tokens=list(tokens), own_start=len(tokens)))
    return state


def child_of(state: RequestState, parent: Branch, child_token: int = 2) -> Branch:
    """A child as the engine makes it: the parent's tokens (ending in [Fork]) + [Child]."""
    child = Branch(
        id=len(state.branches),
        parent=parent,
        depth=parent.depth + 1,
        tokens=parent.tokens + [child_token],
        own_start=len(parent.tokens),
        fork_index=len(parent.output_ids) - 1,
    )
    parent.children[child.fork_index] = child
    state.branches.append(child)
    return child
