"""Shared-prefix (cascade) attention for decode rows whose block tables start alike.

Sibling branches of a request, and requests that hit the same cached system prompt, hold the
same physical blocks for their common prefix. The plain path gathers that prefix once per row
in every layer; here the queries of all rows of a group attend to the prefix once (one gather,
one matrix product), each row attends only to its own remaining blocks, and the two partial
softmaxes are merged by their log-sum-exp (FlashInfer's cascade inference, Hydragen). Equal to
the per-row path up to float rounding (tests/test_cascade.py). With the native kernels the
prefix pass is `paged_prefix` (csrc/paged_decode.cpp), which reads the blocks in place; on
SmolLM2 it is about 1.5x faster than torch's CPU flash kernel on the same view.

A prefix whose blocks are consecutive in the pool (a prompt's blocks, allocated together) is read
in place, as a view of the cache, with no gather at all; so is a lone row's leading run of
consecutive blocks, which is where a step of many separate long requests spends its time.
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

    @property
    def start(self) -> int | None:
        """The first block when the blocks are consecutive ids (readable in place), else None."""
        return self.blocks[0] if _run(self.blocks) == len(self.blocks) else None


MIN_RUN_BLOCKS = 8  # a lone row's leading run is read in place from this length on ...
MIN_ROWS_FOR_RUNS = 8  # ... in steps of this many rows (below, one batched gather is cheaper)
Sel = slice | torch.Tensor  # token positions: a slice where they are consecutive (no gather)


def as_sel(idx: list[int], device: torch.device) -> Sel:
    """Consecutive positions as a slice (a view when indexing), others as an index tensor."""
    if idx and idx == list(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0], idx[0] + len(idx))
    return torch.tensor(idx, dtype=torch.long, device=device)


@dataclass
class GroupMeta:
    """One group, ready for a step: its queries (flat tokens), their rows in the batched
    [B * Q] layout, and its prefix blocks (`start`: readable in place)."""

    q_sel: Sel
    row_sel: Sel
    blocks: torch.Tensor
    start: int | None
    num_blocks: int
    row_idx: torch.Tensor  # row_sel as an index tensor (the native merge's rows)


def group_meta(
    groups: list[PrefixGroup], spans: list[tuple[int, int]], q_len: int | None, device: torch.device
) -> list[GroupMeta]:
    """`spans`: each short row's flat token range [start, end), in row order; rows are padded
    to `q_len` query tokens in the batched layout (None: not padded, the native kernel's items)."""
    first = [0]
    for a, b in spans:
        first.append(first[-1] + (b - a if q_len is None else q_len))
    out = []
    for g in groups:
        toks = [t for i in g.rows for t in range(*spans[i])]
        rows = [first[i] + j for i in g.rows for j in range(spans[i][1] - spans[i][0])]
        blocks = torch.tensor(g.blocks, dtype=torch.long, device=device)
        row_idx = torch.tensor(rows, dtype=torch.long, device=device)
        out.append(
            GroupMeta(as_sel(toks, device), as_sel(rows, device), blocks, g.start, g.num_blocks, row_idx)
        )
    return out


def _run(table: list[int], limit: int | None = None) -> int:
    """Length of the leading run of consecutive block ids (at most `limit`)."""
    limit = len(table) if limit is None else min(limit, len(table))
    n = 0
    while n < limit and table[n] == table[0] + n:
        n += 1
    return n


def find_groups(
    tables: list[list[int]], first_positions: list[int], block_size: int, runs: bool = True
) -> list[PrefixGroup]:
    """Groups of two or more rows with at least one shared full block before their queries, then
    (with `runs`, in steps of MIN_ROWS_FOR_RUNS rows or more) lone rows whose first
    MIN_RUN_BLOCKS or more blocks are consecutive."""
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
    grouped = {i for g in groups for i in g.rows}
    if not runs or len(tables) < MIN_ROWS_FOR_RUNS:
        return groups
    for i, table in enumerate(tables):
        n = _run(table, first_positions[i] // block_size) if i not in grouped and table else 0
        if n >= MIN_RUN_BLOCKS:
            groups.append(PrefixGroup([i], table[:n]))
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


def run_cascade(
    q: torch.Tensor,
    qb: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    mask: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    groups: list[GroupMeta],
    scale: float,
) -> torch.Tensor:
    """The short rows over their own blocks (qb, kb, vb, mask as batched by AttentionMetadata),
    then each group's queries over its prefix, merged. Returns [B * Q, H, D] (padded rows too)."""
    h, d = q.shape[0], q.shape[-1]
    ob, lse = attend_with_lse(qb, kb, vb, mask, scale)
    rows_o = ob.transpose(1, 2).reshape(-1, h, d)
    rows_l = lse.transpose(1, 2).reshape(-1, h)
    return merge_groups(q, rows_o, rows_l, k_cache, v_cache, groups, scale)


def merge_groups(
    q: torch.Tensor,
    rows_o: torch.Tensor,
    rows_l: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    groups: list[GroupMeta],
    scale: float,
    kernel=None,
) -> torch.Tensor:
    """Each group's queries (q [H, T, D]) over its prefix, merged into the rows' attention over
    their own blocks (rows_o [R, H, D], rows_l [R, H]) in place; returns rows_o. With the native
    `kernel` (apar_worker/native.py) the prefix is read in place through its block list."""
    kvh, _, bs, d = k_cache.shape
    for g in groups:
        if kernel is not None:
            qg = q[:, g.q_sel].transpose(0, 1)  # [M, H, D]
            o, lse = kernel.paged_prefix(qg, k_cache, v_cache, g.blocks, g.num_blocks * bs, scale)
            kernel.merge_attention_(rows_o, rows_l, g.row_idx, o, lse)
            continue
        if g.start is not None:  # consecutive blocks: a view of the cache, nothing copied
            kp = k_cache[:, g.start : g.start + g.num_blocks].reshape(kvh, -1, d)
            vp = v_cache[:, g.start : g.start + g.num_blocks].reshape(kvh, -1, d)
        else:
            kp = k_cache.index_select(1, g.blocks).view(kvh, -1, d)
            vp = v_cache.index_select(1, g.blocks).view(kvh, -1, d)
        op, lse_p = attend_with_lse(q[None, :, g.q_sel], kp[None], vp[None], None, scale)
        rows_o[g.row_sel] = merge(op[0].transpose(0, 1), lse_p[0].T, rows_o[g.row_sel], rows_l[g.row_sel])
    return rows_o
