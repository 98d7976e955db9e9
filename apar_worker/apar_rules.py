"""The APAR decoding rules: what the engine forbids before sampling and does with each token.

Before sampling, `[Child]` is never allowed and `[Fork]` may not follow `[Fork]` or `[Child]`.
After sampling, in this order: a stop string or EOS ends the branch; a `[Fork]` within the
request's `max_depth` / `max_branches` makes a child that shares the parent's KV blocks and is
fed `[Child]` at the parent's next position; a branch that reaches the model's context ends
with "length"; the request's `max_tokens` (all branches counted) ends every branch with
"length" (docs/design.md, "Decoding contract").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from apar_worker.kv_manager import KVManager
from apar_worker.sequence import Branch, RequestState
from apar_worker.types import CHILD_TOKEN, FORK_TOKEN, BranchEvent, FinishReason

STOP_LOOKBACK_CHARS = 64  # a stop string is searched in the text's last len(stop) + 64 characters


@dataclass
class ControlIds:
    """The tokenizer's ids of the control tokens (None: the model has none) and of EOS."""

    fork: int | None
    child: int | None
    eos: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, model, tokenizer) -> ControlIds:
        vocab = tokenizer.get_vocab()
        eos: set[int] = set()
        gen = getattr(model, "generation_config", None)
        for src in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, list | tuple):
                eos.update(int(x) for x in src)
        return cls(vocab.get(FORK_TOKEN), vocab.get(CHILD_TOKEN), eos)


class AparRules:
    """Applies the rules to one request's branches; `new_branch` sets up a forked child."""

    def __init__(
        self,
        ids: ControlIds,
        max_model_len: int,
        kv: KVManager,
        new_branch: Callable[[RequestState, Branch], None],
    ) -> None:
        self.ids = ids
        self.max_model_len = max_model_len
        self.kv = kv
        self.new_branch = new_branch

    def mask_logits(self, rows: list[tuple[RequestState, Branch]], logits: torch.Tensor) -> None:
        """Ban `[Child]` everywhere and `[Fork]` right after a control token (in place)."""
        fork, child = self.ids.fork, self.ids.child
        if child is not None:
            logits[:, child] = -math.inf
        if fork is not None:
            for i, (_, br) in enumerate(rows):
                if br.tokens[-1] in (fork, child):
                    logits[i, fork] = -math.inf

    def on_token(self, state: RequestState, br: Branch, tok: int, results: list) -> None:
        """Append a sampled token to its branch and apply every rule; events go to `results`."""
        req = state.request
        br.tokens.append(tok)
        state.num_generated += 1
        # A child's creation has its own event; the root's first token announces the root.
        first_root = br.parent is None and len(br.tokens) == br.own_start + 1
        event = BranchEvent(req.request_id, br.id, _parent_id(br), [tok], created=first_root)
        results.append(event)
        if br.detok is not None:
            br.text += br.detok.add(tok)
            if req.sampling.stop and _cut_at_stop(br, req.sampling.stop):
                br.text_cut = True
                self.end_branch(br, "stop", event)
        if br.finished:
            pass
        elif tok in self.ids.eos and not req.sampling.ignore_eos:
            self.end_branch(br, "stop", event)
        elif tok == self.ids.fork and self.may_fork(state, br):
            self.fork(state, br, results)
        if not br.finished and len(br.tokens) >= self.max_model_len:
            self.end_branch(br, "length", event)
        if state.num_generated >= req.sampling.max_tokens:
            self._end_request_at_max_tokens(state, br, event, results)
        _stream_text(br, event, req.sampling.stop)

    def _end_request_at_max_tokens(
        self, state: RequestState, br: Branch, event: BranchEvent, results: list
    ) -> None:
        for other in state.live_branches():
            ev = event
            if other is not br:
                ev = BranchEvent(state.request_id, other.id, _parent_id(other), [])
                results.append(ev)
            self.end_branch(other, "length", ev)
            if other is not br:
                _stream_text(other, ev, state.request.sampling.stop)
        state.finish_reason = "length"

    @staticmethod
    def may_fork(state: RequestState, br: Branch) -> bool:
        req = state.request
        return req.fork and br.depth < req.max_depth and len(state.branches) < req.max_branches

    def fork(self, state: RequestState, parent: Branch, results: list) -> None:
        """The child shares the parent's blocks; it is fed [Fork]@p and [Child]@p+1."""
        child = Branch(
            id=len(state.branches),
            parent=parent,
            depth=parent.depth + 1,
            tokens=parent.tokens + [self.ids.child],
            own_start=len(parent.tokens),
            fork_index=len(parent.output_ids) - 1,
        )
        self.kv.fork(parent, child, len(parent.tokens) - 1)
        parent.children[child.fork_index] = child
        self.new_branch(state, child)
        results.append(BranchEvent(state.request_id, child.id, parent.id, [], created=True))

    def end_branch(self, br: Branch, reason: FinishReason, event: BranchEvent) -> None:
        if br.finished:
            return
        br.finish_reason = reason
        if br.detok is not None and not br.text_cut:  # half a character may still be held back
            br.text += br.detok.flush()
        self.kv.free(br)
        event.finish_reason = reason

    @staticmethod
    def finish_reason(state: RequestState) -> FinishReason:
        """Why a request whose branches all ended is over: a branch cut off by the model's
        context makes the answer "length", not "stop"."""
        cut = any(b.finish_reason == "length" for b in state.branches)
        return state.finish_reason or ("length" if cut else "stop")


def held_back(stops: list[str]) -> int:
    """Characters of a live branch's text not streamed yet: where a stop string may begin."""
    return max(map(len, stops)) - 1 if stops else 0


def _stream_text(br: Branch, event: BranchEvent, stops: list[str]) -> None:
    """The event's delta of the branch's tracked text: all of it once the branch has ended, else
    all but the last (longest stop string - 1) characters, where a stop string may still begin,
    so the streamed text never runs past the final one."""
    if br.detok is None:
        return
    upto = max(br.sent, len(br.text) - (0 if br.finished else held_back(stops)))
    event.delta_text += br.text[br.sent : upto]
    br.sent = upto


def _parent_id(br: Branch) -> int | None:
    return br.parent.id if br.parent else None


def _cut_at_stop(br: Branch, stops: list[str]) -> bool:
    """Cut the tracked text where a stop string starts; True when one matched."""
    for s in stops:
        idx = br.text.find(s, max(0, len(br.text) - len(s) - STOP_LOOKBACK_CHARS))
        if idx >= 0:
            br.text = br.text[:idx]
            return True
    return False
