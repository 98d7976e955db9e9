"""AttentionMetadata without a model: slots, the short/long split, padding masks, work counted."""

from __future__ import annotations

import math

import torch

from apar_worker.attention import MAX_BATCHED_QUERY, AttentionMetadata, SeqSlice

BS = 4
CPU = torch.device("cpu")


def test_slot_mapping_follows_each_block_table():
    seqs = [SeqSlice(0, 1, [5, 2], 6), SeqSlice(1, 3, [7], 1)]  # decode at 6; two tokens at 1, 2
    meta = AttentionMetadata.build(seqs, BS, CPU)
    assert meta.slot_mapping.tolist() == [2 * BS + 2, 7 * BS + 1, 7 * BS + 2]
    assert meta.num_tokens == 3


def test_short_queries_are_batched_with_padding_and_masks():
    seqs = [SeqSlice(0, 1, [5, 2], 6), SeqSlice(1, 3, [7], 1)]
    meta = AttentionMetadata.build(seqs, BS, CPU)
    assert meta.long == [] and meta.dec_shape == (2, 2)
    assert meta.dec_q_idx.tolist() == [[0, 0], [1, 2]]
    assert meta.dec_blocks.tolist() == [5, 2, 7, 7]  # row 2 padded with its first block
    assert meta.dec_valid.tolist() == [True, False, True, True]
    assert meta.dec_tok.tolist() == [0, 1, 2]
    mask = meta.dec_mask[:, 0]
    allowed = (mask == 0).sum(-1).tolist()
    assert allowed == [[7, 1], [2, 3]]  # keys 0..pos; the padded row sees one key (no NaN)
    assert mask[0, 0, 7].item() == -math.inf


def test_long_queries_are_attended_one_by_one():
    n = MAX_BATCHED_QUERY + 1
    fresh = SeqSlice(0, n, [3, 4, 9], 0)  # prefill from position 0: plain causal
    chunk = SeqSlice(n, 2 * n, [1, 6, 8, 0], 5)  # a later chunk: explicit mask over the cache
    meta = AttentionMetadata.build([fresh, chunk], BS, CPU)
    assert meta.dec_q_idx is None and len(meta.long) == 2
    start, end, blocks, ctx, mask = meta.long[0]
    assert (start, end, blocks.tolist(), ctx, mask) == (0, n, [3, 4, 9], n, None)
    start, end, blocks, ctx, mask = meta.long[1]
    assert (start, end, blocks.tolist(), ctx) == (n, 2 * n, [1, 6, 8, 0], 5 + n)
    assert mask.shape == (1, n, 5 + n) and (mask[0] == 0).sum(-1).tolist() == list(range(6, 6 + n))


def test_attended_tokens_count_keys_per_query():
    seqs = [SeqSlice(0, 1, [0, 1], 6), SeqSlice(1, 4, [2], 0)]
    meta = AttentionMetadata.build(seqs, BS, CPU)
    assert meta.attended_tokens == 7 + (1 + 2 + 3)
