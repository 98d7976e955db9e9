"""One step's logits into tokens: sample, keep the drafts that match, apply the APAR rules.

A branch that fed k speculative drafts has k + 1 logits rows. They are sampled in waves: wave j
samples row j of every branch whose drafts before j were all kept, so each row is sampled with
the branch's context exactly as decoding without drafts would have it (the logits hook, the
[Fork] mask and the repetition penalty see the tokens accepted so far; the branch's generator
draws once per token, in the same order). A sampled token equal to the branch's next draft
keeps that draft's K/V (commit) and goes on; the first one that differs is the branch's last
token this step, and the blocks past its computed tokens are released (`KVManager.trim`).
Each kept token goes through `AparRules.on_token` on its own, so a `[Fork]` inside a draft
forks at its position and stop strings, EOS and the limits apply per token.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from apar_worker.apar_rules import AparRules
from apar_worker.kv_manager import KVManager
from apar_worker.sampling import sample
from apar_worker.sequence import Branch, RequestState, RequestStatus
from apar_worker.speculative import Speculator

Rows = list[tuple[RequestState, Branch]]
LogitsHook = Callable[[Rows, torch.Tensor], "torch.Tensor | None"]


class TokenApplier:
    def __init__(
        self,
        rules: AparRules,
        kv: KVManager,
        speculator: Speculator,
        hook: LogitsHook | None,
        argmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.rules = rules
        self.kv = kv
        self.speculator = speculator
        self.hook = hook
        self.argmax = argmax  # greedy rows' argmax (sampling.sample): the native kernel's, or None

    def apply(
        self, rows: Rows, first_row: list[int], drafts: list[list[int]], logits: torch.Tensor, results: list
    ) -> tuple[int, list[int], list[RequestState]]:
        """Sample every row wave by wave; returns (tokens kept, per branch the logits row of its
        last token (-1: none), requests left with no live branch)."""
        now = time.monotonic()
        kept = [0] * len(rows)
        accepted = [0] * len(rows)
        active = list(range(len(rows)))
        wave = 0
        while active:
            tokens = self._sample(
                [rows[i] for i in active], _take(logits, [first_row[i] + wave for i in active])
            )
            going_on = []
            for i, tok in zip(active, tokens, strict=True):
                state, br = rows[i]
                if state.status is not RequestStatus.RUNNING or br.finished:
                    continue  # ended earlier in this step (max_tokens of a sibling, a stop)
                if state.first_token_time is None:
                    state.first_token_time = now
                kept[i] += 1
                self.rules.on_token(state, br, tok, results)
                draft = drafts[i]
                if wave < len(draft) and tok == draft[wave]:
                    accepted[i] += 1
                    if not br.finished:
                        self.kv.commit(br, 1)  # the draft fed at this position was right: its K/V stay
                        going_on.append(i)
            active = going_on
            wave += 1
        for i, (_, br) in enumerate(rows):
            if drafts[i]:
                self.speculator.record(br, len(drafts[i]), accepted[i])
                if not br.finished:
                    self.kv.trim(br)
        finished = {id(s): s for s, _ in rows if s.status is RequestStatus.RUNNING and not s.live_branches()}
        last = [first_row[i] + n - 1 if n else -1 for i, n in enumerate(kept)]
        return sum(kept), last, list(finished.values())

    def _sample(self, rows: Rows, logits: torch.Tensor) -> list[int]:
        if self.hook is not None:
            replaced = self.hook(rows, logits)
            if replaced is not None:
                logits = replaced
        self.rules.mask_logits(rows, logits)
        return sample(
            logits,
            [s.request.sampling for s, _ in rows],
            [br.tokens for _, br in rows],
            [br.generator for _, br in rows],
            self.argmax,
        )


def _take(logits: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Rows `idx` of the logits: a view where they are consecutive (every step without drafts),
    so the [rows, vocab] matrix is not copied."""
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return logits[idx[0] : idx[0] + len(idx)]
    return logits[idx]
