"""Packed linear layers (`linear_kernel`: oneDNN and the native C++ kernel) against the plain
`nn.Linear` path."""

from __future__ import annotations

import copy

import pytest
import torch
from engine_utils import make_model, make_tokenizer
from test_engine import assert_pool_empty, forcing_hook
from torch import nn

from apar_worker.engine import Engine, EngineConfig
from apar_worker.native import native_module
from apar_worker.packed_linear import NativeLinear, PackedLinear, pack_model, parse_linear_kernel
from apar_worker.types import GenerateRequest, ModelLoadError, SamplingParams

KERNEL = native_module()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no C++ compiler or ninja on this machine")
PACKED = (PackedLinear, NativeLinear)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (300, 64), (2, 5, 64)])
def test_a_packed_layer_computes_what_the_plain_layer_computes(bias, shape):
    torch.manual_seed(0)
    lin = nn.Linear(64, 40, bias=bias)
    packed = PackedLinear(lin)
    x = torch.randn(*shape)
    out = packed(x)
    assert out.shape == (*shape[:-1], 40)
    torch.testing.assert_close(out, lin(x), atol=1e-5, rtol=1e-5)
    assert packed.weight is None and packed.packed_bytes == 64 * 40 * 4


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 12, 16, 17, 33, 200])
@pytest.mark.parametrize("out_features", [16, 40, 97, 200])
def test_a_native_layer_computes_what_the_plain_layer_computes(bias, rows, out_features):
    """Register blocks of every size (1-6 rows with AVX2, 1-16 with AVX-512; 1-4 panels at
    once for few rows), full and partial 16-column panels; a row alone gets bit for bit what it
    got in a batch (each column sums its k in one chain, whatever the block)."""
    torch.manual_seed(rows)
    lin = nn.Linear(72, out_features, bias=bias)
    layer = NativeLinear(lin, KERNEL)
    x = torch.randn(2, rows, 72)
    got = layer(x)
    torch.testing.assert_close(got, lin(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(layer(x[:1, :1]), got[:1, :1])
    assert torch.equal(layer(x[1, :2]), got[1, :2])
    assert layer.weight is None and tuple(layer.panels.shape) == (-(-out_features // 16), 72, 16)


@needs_kernel
def test_the_kernels_thread_pool_gives_the_same_floats_from_any_thread_and_under_contention():
    """The kernels split work over their own spinning pool (csrc/spin_pool.h), not OpenMP: from
    the main thread, from another thread, and from four threads at once (one of them runs its
    job, the others inline), every call returns what one thread computes, bit for bit."""
    import threading

    torch.manual_seed(3)
    panels = KERNEL.pack_panels(torch.randn(1000, 96))
    inputs = [torch.randn(rows, 96) for rows in (1, 6, 16, 40)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = [KERNEL.skinny_linear(x, panels, 1000) for x in inputs]
    finally:
        torch.set_num_threads(threads)
    got: dict[int, list[torch.Tensor]] = {}

    def work(key: int) -> None:
        got[key] = [KERNEL.skinny_linear(x, panels, 1000) for x in inputs for _ in range(20)][::20]

    work(-1)
    pool = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert sorted(got) == [-1, 0, 1, 2, 3]
    for outs in got.values():
        assert all(torch.equal(o, w) for o, w in zip(outs, want, strict=True))


@needs_kernel
def test_parts_a_descheduled_worker_never_began_are_taken_by_the_caller_with_the_same_floats():
    """With a busy process on the machine the pool's workers often start late; the caller then
    runs their parts itself (spin_pool.h `take`): no call waits out or loses a part, and every
    result is still what one thread computes."""
    import subprocess
    import sys

    torch.manual_seed(4)
    panels = KERNEL.pack_panels(torch.randn(600, 64))
    x = torch.randn(5, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = KERNEL.skinny_linear(x, panels, 600)
        torch.set_num_threads(2)
        spin = "print('busy', flush=True)\nwhile True: pass"
        hog = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True)
        try:
            assert hog.stdout.readline().strip() == "busy"
            outs = [KERNEL.skinny_linear(x, panels, 600) for _ in range(3000)]
        finally:
            hog.kill()
            hog.wait(timeout=10)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, want) for o in outs)


@needs_kernel
def test_the_native_kernel_refuses_bad_shapes_with_a_clear_error():
    panels = KERNEL.pack_panels(torch.randn(40, 64))
    with pytest.raises(RuntimeError, match="shapes disagree"):
        KERNEL.skinny_linear(torch.randn(3, 65), panels, 40, None)
    with pytest.raises(RuntimeError, match="float32"):
        KERNEL.skinny_linear(torch.randn(3, 64).double(), panels, 40, None)


def test_parse_and_refusals():
    assert parse_linear_kernel(None) == "auto"
    assert parse_linear_kernel("plain") == "plain"
    with pytest.raises(ModelLoadError, match="unknown linear_kernel 'avx'"):
        parse_linear_kernel("avx")
    bf16 = make_model("llama").to(torch.bfloat16)
    assert pack_model(bf16, "auto") == "plain"  # the default falls back silently
    with pytest.raises(ModelLoadError, match="float32 only"):
        pack_model(bf16, "onednn")
    with pytest.raises(ModelLoadError, match="linear_kernel native is unavailable: .*float32 CPU"):
        pack_model(bf16, "native")


@pytest.mark.parametrize("kernel", ["onednn", pytest.param("native", marks=needs_kernel)])
def test_auto_leaves_a_callers_model_alone_and_a_named_kernel_packs_every_linear(kernel):
    model = make_model("llama")
    assert pack_model(model, "auto", owned=False) == "plain"
    assert pack_model(model, "plain") == "plain"
    assert not any(isinstance(m, PACKED) for m in model.modules())
    assert pack_model(model, kernel, owned=False) == kernel
    kind = NativeLinear if kernel == "native" else PackedLinear
    assert sum(isinstance(m, kind) for m in model.modules()) == 2 * 7 + 1  # 7 per layer, and the head
    assert not any(type(m) is nn.Linear for m in model.modules())
    head = model.get_output_embeddings()
    assert head.weight is model.get_input_embeddings().weight or head.weight is not None


@needs_kernel
def test_auto_prefers_the_native_kernel_unless_native_kernels_are_off():
    assert pack_model(make_model("llama"), "auto") == "native"
    assert pack_model(make_model("llama"), "auto", native_ok=False) == "onednn"


@pytest.mark.parametrize("kernel", ["onednn", pytest.param("native", marks=needs_kernel)])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_engine_with_packed_linears_decodes_what_the_plain_path_decodes(family, kernel):
    """Forked APAR decoding (forced forks), two requests: same text, logits equal to 1e-4."""
    model = make_model(family, seed=5)
    force = {(0, 2), (0, 5), (1, 3)}
    prompt = list(range(5, 40))

    def run(kernel: str):
        record: list = []
        engine = Engine.from_model(
            copy.deepcopy(model),
            make_tokenizer(),
            EngineConfig(block_size=4, num_blocks=256, linear_kernel=kernel),
            logits_hook=forcing_hook(force, record),
        )
        packed = sum(isinstance(m, PACKED) for m in engine.runner.model.modules())
        sampling = SamplingParams(max_tokens=30, ignore_eos=True)
        reqs = [
            GenerateRequest(prompt_token_ids=prompt, sampling=sampling, request_id=f"r{i}") for i in range(2)
        ]
        outs = engine.generate(reqs)
        assert_pool_empty(engine)
        return outs, record, packed

    plain, rec_plain, n_plain = run("plain")
    packed, rec_packed, n_packed = run(kernel)
    assert n_plain == 0 and n_packed == 15
    assert [o.text for o in packed] == [o.text for o in plain] and len(plain[0].branches) >= 3
    assert len(rec_plain) == len(rec_packed)
    worst = max((a[2] - b[2]).abs().max().item() for a, b in zip(rec_plain, rec_packed, strict=True))
    assert worst < 1e-4, worst


def test_a_model_loaded_by_name_is_packed_by_default_and_plain_is_a_switch():
    def count(kernel: str) -> tuple[int, list]:
        engine = Engine(EngineConfig(model="apar-tiny", device="cpu", num_blocks=64, linear_kernel=kernel))
        req = GenerateRequest(prompt="Name two colours.", sampling=SamplingParams(max_tokens=12))
        out = engine.generate([req])[0]
        return sum(isinstance(m, PACKED) for m in engine.runner.model.modules()), [
            b.token_ids for b in out.branches
        ]

    packed, tokens = count("auto")
    plain, plain_tokens = count("plain")
    assert packed > 0 and plain == 0
    assert tokens == plain_tokens
