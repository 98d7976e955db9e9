"""Shared-prefix (cascade) attention for decode rows whose block tables start alike.

Sibling branches of a request, and requests that hit the same cached system prompt, hold the
same physical blocks for their common prefix. The plain path gathers that prefix once per row
in every layer; here the queries of all rows of a group attend to the prefix once (one gather,
one matrix product), each row attends only to its own remaining blocks, and the two partial
softmaxes are merged by their log-sum-exp (FlashInfer's cascade inference, Hydragen). Equal to
the per-row path up to float rounding (tests/test_cascade.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefixGroup:
    """Rows sharing `blocks` (full blocks wholly before every one of their query tokens)."""

    rows: list[int]  # indices into the short rows
    blocks: list[int]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


def find_groups(tables: list[list[int]], first_positions: list[int], block_size: int) -> list[PrefixGroup]:
    """Groups of two or more rows with at least one shared full block before their queries."""
    by_first: dict[int, list[int]] = {}
    for i, table in enumerate(tables):
        if table and first_positions[i] >= block_size:
            by_first.setdefault(table[0], []).append(i)
    groups = []
    for rows in by_first.values():
        if len(rows) < 2:
            continue
        limit = min(first_positions[i] // block_size for i in rows)
        ref = tables[rows[0]]
        n = 0
        while n < limit and all(tables[i][n] == ref[n] for i in rows):
            n += 1
        if n:
            groups.append(PrefixGroup(rows, ref[:n]))
    return groups


def _gqa(q: torch.Tensor, kvh: int) -> torch.Tensor:
    """[..., H, N, D] -> [..., KVH, rep * N, D]: query head h reads KV head h // rep (HF's order)."""
    *lead, h, n, d = q.shape
    return q.reshape(*lead, kvh, (h // kvh) * n, d)


def attend_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of the scores.

    q [..., H, N, D], k/v [..., KVH, L, D], mask broadcastable to [..., 1, N, L] (additive) ->
    out [..., H, N, D], lse [..., H, N].
    """
    kvh, h, n = k.shape[-3], q.shape[-3], q.shape[-2]
    rep = h // kvh
    scores = torch.matmul(_gqa(q, kvh), k.transpose(-1, -2)) * scale  # [..., KVH, rep*N, L]
    if mask is not None:
        lead = scores.shape[:-3]
        scores = (scores.view(*lead, kvh, rep, n, -1) + mask.unsqueeze(-3)).view(scores.shape)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.matmul(torch.exp(scores - lse), v)  # [..., KVH, rep*N, D]
    lead = out.shape[:-3]
    return out.reshape(*lead, h, n, -1), lse.reshape(*lead, h, n)


def merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Combine two attentions over disjoint key sets: o [N, H, D], lse [N, H]."""
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    return (o1 * w1[..., None] + o2 * w2[..., None]) / (w1 + w2)[..., None]
