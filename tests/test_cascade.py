"""Shared-prefix (cascade) attention equals the per-row gather path."""

from __future__ import annotations

import pytest
import torch
from engine_utils import make_model, make_tokenizer
from test_engine import assert_pool_empty, forcing_hook

from apar_worker.attention import FORWARD_CONTEXT, AttentionMetadata, SeqSlice, paged_attention
from apar_worker.cascade import MIN_ROWS_FOR_RUNS, PrefixGroup, attend_math, find_groups
from apar_worker.engine import Engine, EngineConfig
from apar_worker.kv_cache import KVCache
from apar_worker.types import GenerateRequest, SamplingParams

CPU = torch.device("cpu")


def test_groups_are_rows_sharing_full_blocks_before_their_queries():
    tables = [[4, 5, 6, 9], [4, 5, 7], [4, 8], [1, 2, 3], [4, 5, 6, 11]]
    first = [13, 9, 5, 10, 12]
    groups = find_groups(tables, first, block_size=4)
    assert [(g.rows, g.blocks) for g in groups] == [([0, 1, 2, 4], [4])]
    # without the row that diverges after one block, the others share two
    groups = find_groups([tables[i] for i in (0, 1, 4)], [13, 9, 12], block_size=4)
    assert [(g.rows, g.blocks) for g in groups] == [([0, 1, 2], [4, 5])]
    # a block that is not wholly before a row's queries is not shared
    assert find_groups([[4, 5], [4, 6]], [3, 9], block_size=4) == []
    # a lone row's leading run of consecutive blocks is read in place (from MIN_RUN_BLOCKS on)
    long_run = list(range(40, 52)) + [3]
    others = [[100 + 2 * i, 101] for i in range(MIN_ROWS_FOR_RUNS - 1)]  # no runs, nothing shared
    [g] = find_groups([long_run] + others, [50] + [5] * len(others), block_size=4)
    assert (g.rows, g.blocks, g.start) == ([0], list(range(40, 52)), 40)
    assert find_groups([long_run, [7, 8, 9, 1]], [50, 14], block_size=4) == []  # too few rows to pay
    assert PrefixGroup([0, 1], [33, 18]).start is None


class _Layer(torch.nn.Module):
    layer_idx = 0


def random_cache(kv_heads: int, d: int, bs: int = 4) -> KVCache:
    """One layer, 64 blocks, random K/V (seeded by the caller)."""
    cache = KVCache(1, 64, bs, kv_heads, d, torch.float32, CPU)
    cache.data.normal_()
    return cache


@pytest.mark.parametrize("kv_heads,heads", [(2, 6), (3, 3)])
def test_paged_attention_with_and_without_cascade_agree(kv_heads, heads):
    torch.manual_seed(0)
    bs, d = 4, 16
    cache = random_cache(kv_heads, d, bs)
    # three siblings over a 6-block prefix (blocks 0-5), one unrelated row, one 2-token row
    prefix = list(range(6))
    seqs = [
        SeqSlice(0, 1, prefix + [10, 11], 29),
        SeqSlice(1, 2, prefix + [12], 25),
        SeqSlice(2, 4, prefix + [13, 14], 30),  # two query tokens (a draft)
        SeqSlice(4, 5, [20, 21, 22], 9),
        SeqSlice(5, 6, prefix + [15, 16, 17], 34),
        SeqSlice(6, 7, [33, 18, 34, 19], 14),  # two rows sharing blocks that are not consecutive
        SeqSlice(7, 8, [33, 18, 35], 9),
        SeqSlice(8, 9, list(range(40, 52)) + [36], 50),  # a lone row with 12 consecutive blocks
    ]
    t = 9
    q = torch.randn(1, heads, t, d)
    k = torch.randn(1, kv_heads, t, d)
    v = torch.randn(1, kv_heads, t, d)
    outs = []
    for cascade in (False, True):
        meta = AttentionMetadata.build(seqs, bs, CPU, cascade=cascade)
        assert len(meta.dec_groups or []) == (3 if cascade else 0)
        assert [g.start for g in meta.dec_groups or []] == ([0, None, 40] if cascade else [])
        FORWARD_CONTEXT.kv_cache, FORWARD_CONTEXT.meta = cache, meta
        try:
            outs.append(paged_attention(_Layer(), q, k, v, None, scaling=d**-0.5)[0].clone())
        finally:
            FORWARD_CONTEXT.meta = None
    assert torch.allclose(outs[0], outs[1], atol=1e-5), (outs[0] - outs[1]).abs().max()


@pytest.mark.parametrize("bs", [4, 16])
def test_engine_with_cascade_decodes_what_the_plain_path_decodes(bs, monkeypatch):
    """Forked siblings share a 70-token prompt; two requests share it through the prefix cache."""
    build = AttentionMetadata.build
    grouped: list[int] = []  # rows attended through a shared prefix, per step

    def spy(*args, **kw):
        meta = build(*args, **kw)
        grouped.append(
            sum(
                len(range(999)[g.q_sel]) if isinstance(g.q_sel, slice) else len(g.q_sel)
                for g in meta.dec_groups or ()
            )
        )
        return meta

    monkeypatch.setattr(AttentionMetadata, "build", spy)
    model = make_model("llama", seed=3)
    force = {(0, 2), (0, 4), (0, 6), (1, 3)}
    prompt = list(range(5, 75))

    def run(cascade: bool):
        record: list = []
        engine = Engine.from_model(
            model,
            make_tokenizer(),
            EngineConfig(block_size=bs, num_blocks=2048 // bs, cascade_attention=cascade),
            logits_hook=forcing_hook(force, record),
        )
        sampling = SamplingParams(max_tokens=40, ignore_eos=True)
        reqs = [
            GenerateRequest(prompt_token_ids=prompt, sampling=sampling, request_id=f"r{i}") for i in range(2)
        ]
        outs = engine.generate(reqs)
        assert_pool_empty(engine)
        return outs, record

    (plain, rec_plain) = run(False)
    assert not any(grouped)
    (casc, rec_casc) = run(True)
    assert max(grouped) >= 5, "siblings and the second request attended the prompt through the cascade"
    assert [o.text for o in casc] == [o.text for o in plain] and len(plain[0].branches) >= 4
    assert len(rec_plain) == len(rec_casc)
    worst = max((a[2] - b[2]).abs().max().item() for a, b in zip(rec_plain, rec_casc, strict=True))
    assert worst < 1e-4, worst


def test_the_plain_math_path_equals_the_cpu_flash_kernel():
    """Devices without the CPU kernel (CUDA) take attend_math; both return the same (out, lse)."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)
    mask = torch.zeros(2, 1, 5, 9)
    mask[0, :, :, 7:] = -torch.inf
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=0.25
    )
    for got, want in zip(attend_math(q, k, v, mask, 0.25), flash, strict=True):
        assert torch.allclose(got, want, atol=1e-5)
