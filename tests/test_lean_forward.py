"""The lean Llama forward (apar_worker/lean_forward.py) and its fused ops against HF's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_utils import make_model, make_tokenizer
from test_engine import assert_pool_empty, forcing_hook
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from apar_worker import native
from apar_worker.engine import Engine, EngineConfig
from apar_worker.lean_forward import lean_error
from apar_worker.types import GenerateRequest, SamplingParams

KERNEL = native.native_module()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="no C++ compiler or ninja on this machine")


def test_add_rms_norm_adds_in_place_then_equals_hf_rmsnorm():
    torch.manual_seed(0)
    norm = LlamaRMSNorm(40, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x, delta = torch.randn(7, 40), torch.randn(7, 40)
    residual = x.clone()
    out = KERNEL.add_rms_norm_(residual, delta, norm.weight, norm.variance_epsilon)
    torch.testing.assert_close(residual, x + delta)
    torch.testing.assert_close(out, norm(x + delta), atol=1e-6, rtol=1e-5)
    same = x.clone()
    torch.testing.assert_close(
        KERNEL.add_rms_norm_(same, None, norm.weight, 1e-5), norm(x), atol=1e-6, rtol=1e-5
    )
    torch.testing.assert_close(same, x)  # no delta: the residual is left as it was
    with pytest.raises(RuntimeError, match="weight size"):
        KERNEL.add_rms_norm_(x.clone(), None, torch.ones(39), 1e-5)


def test_rope_in_place_equals_hf_rotary():
    torch.manual_seed(1)
    t, heads, d = 5, 3, 16
    x = torch.randn(t, heads, d)
    angles = torch.randn(t, d // 2).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()
    ref, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos[None], sin[None])
    KERNEL.rope_(x, cos, sin)
    torch.testing.assert_close(x, ref[0].transpose(0, 1), atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="cos/sin"):
        KERNEL.rope_(x, cos[:2], sin[:2])


def test_silu_mul_equals_torch_over_the_whole_range():
    g = torch.linspace(-120, 120, 3 * 4099).view(3, 4099)  # rows not a multiple of 8: the tail runs too
    u = torch.linspace(-3, 3, 3 * 4099).view(3, 4099)
    torch.testing.assert_close(KERNEL.silu_mul(g, u), F.silu(g) * u, atol=1e-6, rtol=1e-5)
    fused = torch.cat([g, u], dim=1)  # the halves of a fused gate-up product: strided rows
    torch.testing.assert_close(KERNEL.silu_mul(fused[:, :4099], fused[:, 4099:]), F.silu(g) * u)
    with pytest.raises(RuntimeError, match="shapes differ"):
        KERNEL.silu_mul(g, u[:, :-1])


@pytest.mark.parametrize(
    "family,kernel,quant",
    [
        ("llama", "plain", None),
        ("qwen2", "plain", None),
        ("llama", "native", None),
        ("qwen2", "auto", "int8"),  # on AMX tiles where the CPU has them
        ("qwen2", "native", "int8"),  # the FMA panels
    ],
)
def test_engine_with_the_lean_forward_decodes_what_hf_forward_decodes(family, kernel, quant):
    """Forced forks, two requests sharing a prompt, ngram drafts, kept hidden states; with
    native linears (float32 or int8 panels), q/k/v and gate/up fused (qwen2 has q/k/v biases)."""
    fuses = kernel == "native" or quant == "int8"
    force = {(0, 2), (0, 6), (1, 4)}
    prompt = [5 + i % 9 for i in range(45)]

    def run(lean: bool):
        record: list = []
        cfg = EngineConfig(
            block_size=4,
            num_blocks=400,
            lean_forward=lean,
            linear_kernel=kernel,
            quantization=quant,
            speculative={"method": "ngram"},
        )
        model = make_model(family, seed=3)  # packing replaces its linears: a fresh copy each run
        engine = Engine.from_model(model, make_tokenizer(), cfg, logits_hook=forcing_hook(force, record))
        assert (engine.runner.lean is not None) == lean
        if lean:
            fused = [f is not None for f in engine.runner.lean.fused.values()]
            assert fused and all(fused) == fuses and any(fused) == fuses
        engine.runner.keep_hidden = True  # what draft heads ask for: the hidden-state split path
        sampling = SamplingParams(max_tokens=40, ignore_eos=True)
        reqs = [
            GenerateRequest(prompt_token_ids=prompt, sampling=sampling, request_id=f"r{i}") for i in range(2)
        ]
        outs = engine.generate(reqs)
        assert_pool_empty(engine)
        if lean:  # all-decode steps ran as C++ layers exactly where every linear is native
            assert (engine.runner.lean.native_steps > 0) == fuses
        return outs, record, engine.runner.last_hidden

    hf, rec_hf, hidden_hf = run(False)
    lean, rec_lean, hidden_lean = run(True)
    assert len(hf[0].branches) >= 3
    assert [o.text for o in lean] == [o.text for o in hf]
    worst = max((a[2] - b[2]).abs().max().item() for a, b in zip(rec_hf, rec_lean, strict=True))
    # On AMX tiles each row is quantized (steps of 1/(127*254) of its largest value): the two
    # paths' float differences of ~1e-7 move a few of them by one step, ~3e-5 of the row's scale.
    tol = 2e-3 if quant == "int8" and kernel == "auto" and KERNEL.amx_available() else 1e-4
    assert worst < tol, worst
    torch.testing.assert_close(hidden_lean, hidden_hf, atol=tol, rtol=tol)


def test_models_it_cannot_run_keep_hf_forward():
    gpt2 = make_model("gpt2")
    assert "not one of llama, qwen2" in lean_error(gpt2, KERNEL)
    engine = Engine.from_model(gpt2, make_tokenizer(), EngineConfig(num_blocks=64))
    assert engine.runner.lean is None and engine.runner.native is not None
    out = engine.generate(
        [GenerateRequest(prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=4))]
    )
    assert out[0].num_tokens == 4
    assert lean_error(make_model("llama"), None) == "the native kernels are not loaded"
    assert "float32 CPU path" in lean_error(make_model("llama").to(torch.bfloat16), KERNEL)


def test_the_rotary_table_is_the_model_s_own_rotary_and_far_positions_still_run():
    from apar_worker.lean_forward import LeanForward

    model = make_model("llama")
    lean = LeanForward(model, KERNEL)
    table = lean.rope[0].shape[0]
    assert table == min(model.config.max_position_embeddings, 16384)
    x = torch.zeros(3, model.config.hidden_size)
    for pos in (torch.tensor([0, 5, table - 1]), torch.tensor([2, table, table + 7])):  # in it, past it
        cos, sin = lean._cos_sin(x, pos)
        want_cos, want_sin = model.model.rotary_emb(x[None], position_ids=pos[None])
        torch.testing.assert_close(cos, want_cos[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sin, want_sin[0], atol=1e-6, rtol=1e-6)
    model.model.rotary_emb.rope_type = "dynamic"  # changes with the length: never tabled
    assert LeanForward(model, KERNEL).rope is None
