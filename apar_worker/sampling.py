"""Token sampling for one engine step: greedy, temperature, top-k, top-p, repetition penalty.

Rows are independent: each branch samples with its own torch.Generator (seeded from the
request seed and the branch's place in the tree, `stream_key`), so a seeded or greedy request
gives the same tokens whatever else shares the batch, and whatever order its children were
made in (speculative drafts let one branch run ahead of another).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from apar_worker.types import SamplingParams


def stream_key(fork_path: list[int]) -> int:
    """A branch's random stream: 0 for the root, else from the [Fork] indices that lead to it."""
    key = 0
    for index in fork_path:
        key = (key * 1_000_003 + index + 1) % (2**61 - 1)
    return key


def make_generator(seed: int | None, stream: int) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + stream) % (2**63))
    return g


def apply_repetition_penalty(row: torch.Tensor, history: list[int], penalty: float) -> None:
    """HF semantics: divide positive logits of seen tokens by the penalty, multiply negative ones."""
    if penalty == 1.0 or not history:
        return
    idx = torch.tensor(sorted(set(history)), dtype=torch.long, device=row.device)
    seen = row[idx]
    row[idx] = torch.where(seen > 0, seen / penalty, seen * penalty)


def _filter_top_k_top_p(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < probs.numel():
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=0)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = cum - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    histories: list[list[int]],
    generators: list[torch.Generator | None],
    argmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[int]:
    """logits: [n, vocab] (float32, banned tokens already at -inf) -> one token id per row.
    `argmax`: the native kernels' row argmax for an all-greedy step on CPU (same ids as
    torch's), else torch's."""
    if all(p.temperature == 0 and p.repetition_penalty == 1.0 for p in params):
        if argmax is not None and logits.device.type == "cpu" and logits.dtype == torch.float32:
            return argmax(logits).tolist()
        return logits.argmax(dim=-1).tolist()
    out: list[int] = []
    for i, p in enumerate(params):
        row = logits[i].float().clone()
        apply_repetition_penalty(row, histories[i], p.repetition_penalty)
        if p.temperature == 0:
            out.append(int(row.argmax()))
            continue
        probs = torch.softmax(row / p.temperature, dim=-1)
        probs = _filter_top_k_top_p(probs, p.top_k, p.top_p)
        gen = generators[i]
        out.append(int(torch.multinomial(probs.cpu(), 1, generator=gen)))
    return out
