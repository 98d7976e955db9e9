"""Attention over the paged KV cache, plugged into Hugging Face models.

The model runner flattens every token of a step (all branches, all requests) into one
sequence of length T and passes per-token `position_ids`. HF computes q/k/v and rotary (or
learned) positions as usual, then calls the function registered here under the name
`apar_paged` instead of its own attention. We write the new K/V into their cache slots, then
attend each token to its own branch's context (read through the branch's block table), so a
forked branch sees exactly its ancestry. All index tensors are built once per step
(`AttentionMetadata`) and reused by every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from apar_worker.cascade import GroupMeta, as_sel, find_groups, group_meta, merge_groups, run_cascade
from apar_worker.kv_cache import KVCache

ATTN_IMPLEMENTATION = "apar_paged"

# Sequences with more query tokens than this in one step are attended one by one (prefill
# chunks); shorter ones (decode, speculative drafts) are padded and batched together.
MAX_BATCHED_QUERY = 8


@dataclass
class SeqSlice:
    """One branch's part of the flat batch: tokens [start, end) at positions from `first_position`."""

    start: int
    end: int
    block_table: list[int]  # covers every context position, new tokens included
    first_position: int  # position of token `start` (== number of cached tokens before it)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot (block * block_size + offset) of each new token
    num_tokens: int
    # Batched short-query group (None when empty).
    dec_q_idx: torch.Tensor | None = None  # [B, Q] flat token index (padded)
    dec_blocks: torch.Tensor | slice | None = None  # [B * NB] block ids, rows padded to NB blocks
    dec_shape: tuple[int, int] = (0, 0)  # (B, NB)
    dec_mask: torch.Tensor | None = None  # [B, 1, Q, NB * block_size] additive (0 / -inf)
    dec_valid: torch.Tensor | None = None  # [B*Q] which padded query rows are real
    dec_tok: torch.Tensor | None = None  # [N] flat token index of each real row
    dec_q_slice: slice | None = None  # the short rows' tokens, when they are one per row, in order
    # Cascade: groups of rows attending a prefix apart (apar_worker/cascade.py); the batched
    # rows above then hold only each row's blocks after its group's prefix.
    dec_groups: list[GroupMeta] | None = None
    # Native kernel (apar_worker/native.py): every short query token is one item reading its
    # blocks in place; then the dec_* tensors above stay None (but dec_groups may be set).
    nat_tok: torch.Tensor | slice | None = None  # [N] flat token index of each item
    nat_tables: torch.Tensor | None = None  # [N, MAXB] its blocks from its first key on (padded)
    nat_keys: torch.Tensor | None = None  # [N] its key count
    # Long-query sequences: (start, end, blocks [NB], context length, mask [1, q, L] or None if causal)
    long: list[tuple[int, int, torch.Tensor | slice, int, torch.Tensor | None]] | None = None
    attended_tokens: int = 0  # sum over query tokens of keys attended (attention work metric)

    @classmethod
    def build(
        cls,
        seqs: list[SeqSlice],
        block_size: int,
        device: torch.device,
        cascade: bool = False,
        native: bool = False,
    ) -> AttentionMetadata:
        slot_mapping: list[int] = []
        short: list[SeqSlice] = []
        long = []
        attended = 0
        bs = block_size
        for s in seqs:
            n = s.end - s.start
            table = s.block_table
            slot_mapping.extend(
                table[p // bs] * bs + p % bs for p in range(s.first_position, s.first_position + n)
            )
            attended += n * s.first_position + n * (n + 1) // 2
            if n <= MAX_BATCHED_QUERY:
                short.append(s)
                continue
            ctx = s.first_position + n
            blocks = as_sel(table[: -(-ctx // bs)], device)
            mask = None
            if s.first_position > 0:
                qpos = torch.arange(s.first_position, ctx, device=device)
                allowed = torch.arange(ctx, device=device)[None, :] <= qpos[:, None]
                mask = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, -math.inf)[None]
            long.append((s.start, s.end, blocks, ctx, mask))
        meta = cls(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            num_tokens=len(slot_mapping),
            long=long,
            attended_tokens=attended,
        )
        if short:
            meta._build_short(short, bs, device, cascade, native)
        return meta

    def _build_short(
        self, seqs: list[SeqSlice], bs: int, device: torch.device, cascade: bool, native: bool
    ) -> None:
        b = len(seqs)
        q = max(s.end - s.start for s in seqs)
        tables, firsts = [s.block_table for s in seqs], [s.first_position for s in seqs]
        # lone rows' runs help only the torch path: the kernel reads every row in place anyway
        groups = find_groups(tables, firsts, bs, runs=not native) if cascade else []
        skip = [0] * b  # blocks of each row attended in its group's shared-prefix pass instead
        for g in groups:
            for i in g.rows:
                skip[i] = g.num_blocks
        spans = [(s.start, s.end) for s in seqs]
        if native:
            self._build_items(seqs, skip, bs, device)
            self.dec_groups = group_meta(groups, spans, None, device) if groups else None
            return
        nb = max(-(-(s.first_position + s.end - s.start) // bs) - k for s, k in zip(seqs, skip, strict=True))
        q_idx = torch.zeros((b, q), dtype=torch.long)
        offset = torch.tensor(skip, dtype=torch.long) * bs  # position of each row's first key
        qpos = offset[:, None].repeat(1, q)
        valid = torch.zeros((b, q), dtype=torch.bool)
        blocks = []
        for i, s in enumerate(seqs):
            n = s.end - s.start
            q_idx[i, :n] = torch.arange(s.start, s.end)
            qpos[i, :n] = torch.arange(s.first_position, s.first_position + n)
            valid[i, :n] = True
            row = s.block_table[skip[i] : -(-(s.first_position + n) // bs)]
            blocks.extend(row)
            blocks.extend([row[0]] * (nb - len(row)))  # padding: masked out below
        # Padded query rows sit at their first key's position: they attend to one key (no NaN)
        # and are dropped.
        allowed = torch.arange(nb * bs)[None, None, :] + offset[:, None, None] <= qpos[:, :, None]
        mask = torch.zeros(allowed.shape).masked_fill_(~allowed, -math.inf)
        valid_flat = valid.reshape(-1)
        self.dec_q_idx = q_idx.to(device)
        # one row over consecutive blocks (a request decoding alone): read in place
        self.dec_blocks = (
            as_sel(blocks, device) if b == 1 else torch.tensor(blocks, dtype=torch.long, device=device)
        )
        self.dec_shape = (b, nb)
        self.dec_mask = mask[:, None].to(device)
        self.dec_valid = valid_flat.to(device)
        self.dec_tok = q_idx.reshape(-1)[valid_flat].to(device)
        if q == 1 and spans == [(seqs[0].start + i, seqs[0].start + i + 1) for i in range(b)]:
            self.dec_q_slice = slice(seqs[0].start, seqs[0].start + b)
        if groups:
            self.dec_groups = group_meta(groups, spans, q, device)

    def _build_items(self, seqs: list[SeqSlice], skip: list[int], bs: int, device: torch.device) -> None:
        toks: list[int] = []
        keys: list[int] = []
        rows: list[list[int]] = []
        for s, k in zip(seqs, skip, strict=True):
            for j in range(s.end - s.start):
                ctx = s.first_position + j + 1  # the query sees itself and everything before
                toks.append(s.start + j)
                keys.append(ctx - k * bs)
                rows.append(s.block_table[k : -(-ctx // bs)])
        width = max(len(r) for r in rows)
        padded = [r + [0] * (width - len(r)) for r in rows]  # padding is never read
        self.nat_tok = as_sel(toks, device)
        self.nat_tables = torch.tensor(padded, dtype=torch.long, device=device)
        self.nat_keys = torch.tensor(keys, dtype=torch.long, device=device)


class _ForwardContext:
    """What the attention function needs for the forward pass in progress."""

    kv_cache: KVCache | None = None
    meta: AttentionMetadata | None = None
    native: object | None = None  # the built kernel module when meta has items (native.py)


FORWARD_CONTEXT = _ForwardContext()


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF attention interface: query [1, H, T, D], key/value [1, KVH, T, D] -> [1, T, H, D]."""
    meta = FORWARD_CONTEXT.meta
    cache = FORWARD_CONTEXT.kv_cache
    if meta is None or cache is None:
        raise RuntimeError("paged attention called outside an engine step")
    k_cache, v_cache = cache.layer(module.layer_idx)  # [KVH, blocks, bs, D]
    kvh, num_blocks, bs, head_dim = k_cache.shape
    k_flat = k_cache.view(kvh, num_blocks * bs, head_dim)
    v_flat = v_cache.view(kvh, num_blocks * bs, head_dim)
    k_flat.index_copy_(1, meta.slot_mapping, key[0].to(k_flat.dtype))
    v_flat.index_copy_(1, meta.slot_mapping, value[0].to(v_flat.dtype))

    q = query[0]  # [H, T, D]
    num_heads = q.shape[0]
    gqa = num_heads != kvh
    out = q.new_empty((meta.num_tokens, num_heads, head_dim))
    if meta.nat_tables is not None:
        _attend_items(out, q, k_cache, v_cache, meta, scaling or head_dim**-0.5)
    elif meta.dec_q_idx is not None:
        _attend_short(out, q, k_cache, v_cache, meta, scaling)
    for start, end, blocks, ctx, mask in meta.long or ():
        qs = q[None, :, start:end]
        ks = _read(k_cache, blocks)[None, :, :ctx]
        vs = _read(v_cache, blocks)[None, :, :ctx]
        os_ = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=gqa
        )
        out[start:end] = os_[0].transpose(0, 1)
    return out[None], None


def _attend_short(out, q, k_cache, v_cache, meta: AttentionMetadata, scaling: float | None) -> None:
    """The batched short rows (decode, drafts): padded to one shape, attended together, or
    through their groups' shared prefixes (cascade) when the metadata found any."""
    kvh, _, bs, head_dim = k_cache.shape
    num_heads = q.shape[0]
    b, nb = meta.dec_shape
    if meta.dec_q_slice is not None:  # one token per row, consecutive: a view
        qb = q[:, meta.dec_q_slice, None].transpose(0, 1)  # [B, H, 1, D]
    else:
        qb = q[:, meta.dec_q_idx].transpose(0, 1)  # [B, H, Q, D]
    kb = _read(k_cache, meta.dec_blocks).view(kvh, b, nb * bs, head_dim).transpose(0, 1)
    vb = _read(v_cache, meta.dec_blocks).view(kvh, b, nb * bs, head_dim).transpose(0, 1)
    if meta.dec_groups:
        scale = scaling or head_dim**-0.5
        ob = run_cascade(q, qb, kb, vb, meta.dec_mask, k_cache, v_cache, meta.dec_groups, scale)
    else:
        ob = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=meta.dec_mask, scale=scaling, enable_gqa=num_heads != kvh
        )
        ob = ob.transpose(1, 2).reshape(-1, num_heads, head_dim)  # [B*Q, H, D]
    if meta.dec_q_slice is not None:
        out[meta.dec_q_slice] = ob
    else:
        out[meta.dec_tok] = ob[meta.dec_valid]


def _attend_items(out, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> None:
    """The short rows' query tokens through the native kernel, one item each (no gather), then
    their groups' shared prefixes merged in (cascade)."""
    kernel = FORWARD_CONTEXT.native
    if kernel is None:
        raise RuntimeError("attention metadata for the native kernel, but no kernel is loaded")
    qn = q[:, meta.nat_tok].transpose(0, 1)  # [N, H, D]
    o, lse = kernel.paged_decode(qn, k_cache, v_cache, meta.nat_tables, meta.nat_keys, scale)
    if meta.dec_groups:
        o = merge_groups(q, o, lse, k_cache, v_cache, meta.dec_groups, scale, kernel)
    out[meta.nat_tok] = o


def _read(cache: torch.Tensor, blocks: torch.Tensor | slice) -> torch.Tensor:
    """[KVH, n * block_size, D] of the given blocks: consecutive ones are a view of the cache
    (nothing copied), others are gathered."""
    part = cache[:, blocks] if isinstance(blocks, slice) else cache.index_select(1, blocks)
    return part.reshape(cache.shape[0], -1, cache.shape[-1])


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
