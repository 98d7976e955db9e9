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


def attend_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of the scores.

    q [B, H, N, D], k/v [B, KVH, L, D], additive mask [B, 1, N, L] or None -> out [B, H, N, D],
    lse [B, H, N]. The queries of one KV head are stacked ([B, KVH, rep * N, D]) so K/V are
    never repeated. On CPU this is torch's flash kernel, which returns the log-sum-exp.
    """
    b, h, n, d = q.shape
    kvh, length = k.shape[1], k.shape[2]
    rep = h // kvh
    qg = q.reshape(b, kvh, rep * n, d)
    if mask is not None and rep > 1:
        mask = mask.unsqueeze(2).expand(b, 1, rep, n, length).reshape(b, 1, rep * n, length)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qg, k, v, 0.0, False, attn_mask=mask, scale=scale
        )
    else:
        out, lse = attend_math(qg, k, v, mask, scale)
    return out.reshape(b, h, n, d), lse.reshape(b, h, n)


def attend_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in plain tensor ops (CUDA and other devices): q, k, v with equal head counts."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v), lse


def merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Combine two attentions over disjoint key sets: o [N, H, D], lse [N, H]."""
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    return (o1 * w1[..., None] + o2 * w2[..., None]) / (w1 + w2)[..., None]
