"""The C++ decode-attention kernel (apar_worker/native.py) against the torch paths."""

from __future__ import annotations

import logging

import pytest
import torch
from engine_utils import make_model, make_tokenizer
from test_cascade import CPU, _Layer, random_cache
from test_engine import assert_pool_empty, forcing_hook

from apar_worker import native
from apar_worker.attention import FORWARD_CONTEXT, AttentionMetadata, SeqSlice, paged_attention
from apar_worker.cascade import attend_math, merge
from apar_worker.engine import Engine, EngineConfig
from apar_worker.packed_linear import pack_model
from apar_worker.types import GenerateRequest, ModelLoadError, SamplingParams

KERNEL = native.native_module()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no C++ compiler or ninja on this machine")


def _check_decode(q, kc, vc, tables: list[list[int]], keys: list[int]) -> None:
    """paged_decode over each row's blocks equals softmax attention over the same keys."""
    kv_heads, d = kc.shape[0], kc.shape[-1]
    width = max(map(len, tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    out, lse = KERNEL.paged_decode(q, kc, vc, padded, torch.tensor(keys), d**-0.5)
    rep = q.shape[1] // kv_heads
    for i, (table, n) in enumerate(zip(tables, keys, strict=True)):
        k = kc[:, table].reshape(kv_heads, -1, d)[:, :n].repeat_interleave(rep, 0)
        v = vc[:, table].reshape(kv_heads, -1, d)[:, :n].repeat_interleave(rep, 0)
        ref_o, ref_l = attend_math(q[i][:, None], k, v, None, d**-0.5)
        torch.testing.assert_close(out[i], ref_o[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[i], ref_l[:, 0], atol=1e-5, rtol=1e-5)


def _check_prefix(q, kc, vc, blocks: list[int], keys: int) -> None:
    """paged_prefix of every query token over shared blocks equals softmax attention over them."""
    kv_heads, d = kc.shape[0], kc.shape[-1]
    out, lse = KERNEL.paged_prefix(q, kc, vc, torch.tensor(blocks), keys, d**-0.5)
    rep = q.shape[1] // kv_heads
    k = kc[:, blocks].reshape(kv_heads, -1, d)[:, :keys].repeat_interleave(rep, 0)
    v = vc[:, blocks].reshape(kv_heads, -1, d)[:, :keys].repeat_interleave(rep, 0)
    ref_o, ref_l = attend_math(q.transpose(0, 1), k, v, None, d**-0.5)  # [H, M, D], [H, M]
    torch.testing.assert_close(out, ref_o.transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_l.T, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("kv_heads,heads", [(2, 6), (3, 3)])
def test_the_kernel_equals_softmax_attention_over_the_same_blocks(kv_heads, heads):
    torch.manual_seed(1)
    bs, d, nb = 4, 16, 40
    kc, vc = torch.randn(kv_heads, nb, bs, d), torch.randn(kv_heads, nb, bs, d)
    tables = [[3, 7, 1, 9, 20], [0, 1], [39], [5, 6, 7, 8, 9]]
    keys = [19, 5, 1, 20]
    q = torch.randn(len(keys), heads, d)
    _check_decode(q, kc, vc, tables, keys)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 5, 9])
def test_the_prefix_kernel_equals_softmax_attention_over_the_shared_blocks(tokens):
    torch.manual_seed(2)
    kv_heads, heads, bs, d, nb = 3, 9, 4, 16, 30
    kc, vc = torch.randn(kv_heads, nb, bs, d), torch.randn(kv_heads, nb, bs, d)
    blocks, keys = [4, 17, 2, 9], 15  # not consecutive, the last block partly used
    q = torch.randn(tokens, heads, d)
    _check_prefix(q, kc, vc, blocks, keys)
    with pytest.raises(RuntimeError, match="key count"):
        KERNEL.paged_prefix(q, kc, vc, torch.tensor(blocks), 17, d**-0.5)
    with pytest.raises(RuntimeError, match="block id"):
        KERNEL.paged_prefix(q, kc, vc, torch.tensor([4, 99]), 5, d**-0.5)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bs,keys", [(8, 300), (16, 512), (256, 256)])
def test_long_contexts_split_over_threads_merge_to_softmax_attention(threads, bs, keys):
    """One decode row (3 KV heads on 2 threads) splits its keys past 128 a split, each thread
    a range, merged by log-sum-exp; 256 keys in one block of 256 leave the second split empty.
    Two rows (6 items) do not split; the prefix kernel reads the same long context."""
    torch.manual_seed(keys + bs)
    nb = -(-keys // bs) + 3
    kc, vc = torch.randn(3, nb, bs, 64), torch.randn(3, nb, bs, 64)
    blocks = torch.randperm(nb)[: -(-keys // bs)].tolist()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for tokens in (1, 8, 11):
            _check_prefix(torch.randn(tokens, 9, 64), kc, vc, blocks, keys)
        _check_decode(torch.randn(1, 9, 64), kc, vc, [blocks], [keys])
        _check_decode(torch.randn(2, 9, 64), kc, vc, [blocks, blocks[:1]], [keys, min(keys, bs) - 1])
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("d", [16, 32, 64, 128])
@pytest.mark.parametrize("heads", [9, 6])
def test_both_kernels_equal_softmax_attention_at_every_head_size_and_length(d, heads):
    """Lengths on and off the 16-key groups and 64-key chunks of the vector cores; 3 or 2
    query heads per KV head (whole and partial passes of the p . v loop)."""
    torch.manual_seed(d + heads)
    kv_heads, bs, nb = 3, 16, 48
    kc, vc = torch.randn(kv_heads, nb, bs, d), torch.randn(kv_heads, nb, bs, d)
    perm = torch.randperm(nb).tolist()
    keys = [1, 16, 17, 63, 64, 65, 200]
    tables = [perm[: -(-n // bs)] for n in keys]
    q = torch.randn(len(keys), heads, d)
    _check_decode(q, kc, vc, tables, keys)
    _check_prefix(q[:5], kc, vc, perm[:11], 161)  # the prefix kernel: 5 query tokens, shared blocks


@needs_kernel
def test_the_native_merge_equals_the_torch_merge_in_place():
    torch.manual_seed(3)
    out, lse = torch.randn(6, 4, 8), torch.randn(6, 4)
    o, lo = torch.randn(3, 4, 8), torch.randn(3, 4)
    rows = torch.tensor([4, 0, 2])
    expected = out.clone()
    expected[rows] = merge(o, lo, out[rows], lse[rows])
    expected_lse = lse.clone()
    expected_lse[rows] = torch.logaddexp(lse[rows], lo)
    KERNEL.merge_attention_(out, lse, rows, o, lo)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="row out of range"):
        KERNEL.merge_attention_(out, lse, torch.tensor([0, 1, 6]), o, lo)


@needs_kernel
@pytest.mark.parametrize("cascade", [False, True])
def test_paged_attention_through_the_kernel_equals_the_torch_path(cascade):
    torch.manual_seed(0)
    bs, d, kv_heads, heads = 4, 16, 2, 6
    cache = random_cache(kv_heads, d, bs)
    prefix = list(range(6))
    seqs = [
        SeqSlice(0, 1, prefix + [10, 11], 29),
        SeqSlice(1, 2, prefix + [12], 25),
        SeqSlice(2, 5, prefix + [13, 14], 29),  # three query tokens (drafts)
        SeqSlice(5, 6, [20, 21, 22], 9),
        SeqSlice(6, 7, [33, 18, 34, 19], 14),
        SeqSlice(7, 8, [33, 18, 35], 9),
        SeqSlice(8, 20, list(range(40, 45)), 4),  # a prefill chunk: the long path, not the kernel
    ]
    t = 20
    q, k, v = torch.randn(1, heads, t, d), torch.randn(1, kv_heads, t, d), torch.randn(1, kv_heads, t, d)
    outs = []
    for use in (False, True):
        meta = AttentionMetadata.build(seqs, bs, CPU, cascade=cascade, native=use)
        assert (meta.nat_tables is not None) == use
        FORWARD_CONTEXT.kv_cache, FORWARD_CONTEXT.meta = cache, meta
        FORWARD_CONTEXT.native = KERNEL if use else None
        try:
            outs.append(paged_attention(_Layer(), q, k, v, None, scaling=d**-0.5)[0].clone())
        finally:
            FORWARD_CONTEXT.meta = FORWARD_CONTEXT.native = None
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_engine_with_the_kernel_decodes_what_the_torch_path_decodes(family):
    """Forced forks, two requests sharing a prompt, ngram drafts (several query rows a branch)."""
    model = make_model(family, seed=7)
    force = {(0, 2), (0, 6), (1, 4)}
    prompt = [5 + i % 9 for i in range(45)]  # repetitive: the ngram proposer finds drafts

    def run(use: bool):
        record: list = []
        cfg = EngineConfig(block_size=4, num_blocks=400, native_kernels=use, speculative={"method": "ngram"})
        engine = Engine.from_model(model, make_tokenizer(), cfg, logits_hook=forcing_hook(force, record))
        assert (engine.runner.native is not None) == use
        sampling = SamplingParams(max_tokens=40, ignore_eos=True)
        reqs = [
            GenerateRequest(prompt_token_ids=prompt, sampling=sampling, request_id=f"r{i}") for i in range(2)
        ]
        outs = engine.generate(reqs)
        assert_pool_empty(engine)
        return outs, record, engine.stats().spec_draft_tokens

    plain, rec_plain, _ = run(False)
    fast, rec_fast, drafted = run(True)
    assert drafted > 0 and len(plain[0].branches) >= 3
    assert [o.text for o in fast] == [o.text for o in plain]
    assert len(rec_plain) == len(rec_fast)
    worst = max((a[2] - b[2]).abs().max().item() for a, b in zip(rec_plain, rec_fast, strict=True))
    assert worst < 1e-4, worst


def test_no_compiler_means_torch_attention_and_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(native.shutil, "which", lambda tool: None)
    native.native_module.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="apar_worker.native"):
            assert native.native_module() is None
        assert "native kernels unavailable (no c++, ninja on PATH)" in caplog.text
        engine = Engine.from_model(make_model("llama"), make_tokenizer(), EngineConfig(num_blocks=64))
        assert engine.runner.native is None
        out = engine.generate(
            [GenerateRequest(prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=4))]
        )
        assert out[0].num_tokens == 4
        assert pack_model(make_model("llama"), "auto") == "onednn"  # linears fall back as well
        with pytest.raises(ModelLoadError, match="linear_kernel native is unavailable: the native kernels"):
            pack_model(make_model("llama"), "native")
    finally:
        native.native_module.cache_clear()


def test_the_kernel_builds_wherever_a_compiler_and_ninja_are():
    """The kernel tests above skip only where the tools are missing, never on a failed build."""
    if native.shutil.which("c++") and native.shutil.which("ninja"):
        assert KERNEL is not None
        assert hasattr(KERNEL, "paged_decode") and hasattr(KERNEL, "skinny_linear")
    else:
        assert KERNEL is None


@needs_kernel
def test_the_native_argmax_is_torch_s_on_ties_nans_infinities_and_strided_rows():
    torch.manual_seed(4)
    for shape in [(1, 1), (3, 17), (16, 49152), (2, 33)]:
        x = torch.randn(*shape)
        assert torch.equal(KERNEL.argmax_rows(x), x.argmax(-1))
    x = torch.randn(6, 100)
    x[1, 37] = x[1, 80] = float("nan")  # the first NaN wins
    x[2] = -float("inf")  # all -inf: the first
    x[3, 5] = x[3, 60] = 50.0  # a tie: the first
    x[4, 0] = float("nan")
    x[5, 99] = float("nan")  # in the scalar tail
    assert torch.equal(KERNEL.argmax_rows(x), x.argmax(-1))
    rows = torch.randn(20, 49152)[2:18]  # rows of a larger matrix
    assert torch.equal(KERNEL.argmax_rows(rows), rows.argmax(-1))
    with pytest.raises(RuntimeError, match="float32"):
        KERNEL.argmax_rows(torch.randn(2, 8).double())


@needs_kernel
def test_the_vector_peak_scales_with_threads_and_bf16_doubles_the_rate():
    """peak.cpp: chains in registers on every torch thread; VDPBF16PS does 2 multiply-adds a lane."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = KERNEL.fma_peak_gflops(False)
        bf16 = KERNEL.fma_peak_gflops(True)
    finally:
        torch.set_num_threads(before)
    assert one > 1.0  # even a slow core does a GFLOP/s of vector FMAs
    if KERNEL.bf16_rows_available():
        assert bf16 > 1.4 * one
    else:
        assert bf16 == 0.0  # no such instruction in this build: no bf16 figure


@needs_kernel
def test_write_kv_puts_strided_rows_where_index_copy_does():
    """decoder_layer's K/V write: k and v are column views of the fused qkv product."""
    torch.manual_seed(5)
    kv_heads, nb, bs, d, t = 3, 6, 4, 16, 5
    qkv = torch.randn(t, 9 * d + 2 * kv_heads * d)
    k = qkv[:, 9 * d : 9 * d + kv_heads * d].view(t, kv_heads, d)
    v = qkv[:, 9 * d + kv_heads * d :].view(t, kv_heads, d)
    slots = torch.tensor([3, 17, 0, 22, 9])
    kc, vc = torch.randn(kv_heads, nb, bs, d), torch.randn(kv_heads, nb, bs, d)
    want_k, want_v = kc.clone(), vc.clone()
    want_k.view(kv_heads, nb * bs, d).index_copy_(1, slots, k.transpose(0, 1))
    want_v.view(kv_heads, nb * bs, d).index_copy_(1, slots, v.transpose(0, 1))
    KERNEL.write_kv_(kc, vc, slots, k, v)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    with pytest.raises(RuntimeError, match="slot out of range"):
        KERNEL.write_kv_(kc, vc, torch.tensor([0, 1, 2, 3, nb * bs]), k, v)
