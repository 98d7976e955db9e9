"""Weight-only int8 (`quantization: int8`) against the plain fp32 path, on tiny random models."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from engine_utils import make_model, make_tokenizer
from torch import nn

from apar_worker import quantization as q
from apar_worker.engine import Engine, EngineConfig
from apar_worker.native import native_module
from apar_worker.types import GenerateRequest, ModelLoadError, SamplingParams

pytestmark = pytest.mark.skipif(
    q.int8_kernel_error(torch.device("cpu")) is not None, reason="no int8 kernel in this torch build"
)


KERNEL = native_module()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no C++ compiler or ninja on this machine")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_parse_quantization():
    assert q.parse_quantization(None) is None
    assert q.parse_quantization("none") is None
    assert q.parse_quantization("int8") == "int8"
    with pytest.raises(ModelLoadError, match="unknown quantization 'int4'"):
        q.parse_quantization("int4")


def test_quantize_weight_is_per_channel_symmetric():
    w = torch.randn(48, 64) * torch.logspace(-2, 1, 48)[:, None]  # rows of very different size
    qw, scales = q.quantize_weight(w)
    assert qw.dtype == torch.int8 and qw.abs().max() <= 127
    assert torch.all((qw.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7)


@pytest.mark.parametrize("m", [1, 3, 4, 5, 16, 33])
def test_int8_linear_matches_fp32_linear(m):
    torch.manual_seed(m)
    lin = nn.Linear(64, 48, bias=True)
    x = torch.randn(2, m, 64)  # leading dims are kept
    got = q.Int8Linear.of(lin)(x)
    assert got.shape == (2, m, 48) and got.dtype == torch.float32
    # int8 weights (1/254 of each row's range) and bfloat16 activations: about 1 % here.
    assert rel_err(got, lin(x)) < 0.03


@pytest.mark.parametrize("wide", [torch.bfloat16, torch.float32])
def test_the_kernel_and_the_many_row_path_agree(wide):
    """Up to KERNEL_MAX_ROWS rows run the packed kernel, more a dequantized matmul: same values."""
    torch.manual_seed(0)
    layer = q.Int8Linear(torch.randn(48, 64))
    layer.wide_dtype = wide
    x = torch.randn(q.KERNEL_MAX_ROWS + 1, 64)
    few, many = layer(x[: q.KERNEL_MAX_ROWS]), layer(x)
    assert rel_err(many[: q.KERNEL_MAX_ROWS], few) < 0.01  # bf16 rounding apart
    want = x @ (layer.weight_int8.float() * layer.scales.float()[:, None]).T
    assert rel_err(many, want) < 0.01


def test_quantize_model_swaps_every_linear_and_keeps_outputs_close():
    model = make_model("llama")
    plain = copy.deepcopy(model)
    assert q.quantize_model(model, "int8") == 2 * 7 + 1  # q,k,v,o,gate,up,down per layer + lm_head
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = plain(ids).logits[0], model(ids).logits[0]
    # Two layers of int8 weights and bf16 activations on large random weights: about 4 % in norm.
    assert ((got - want).norm() / want.norm()).item() < 0.08
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85


def test_lm_head_can_stay_in_fp32_and_odd_widths_are_skipped():
    model = make_model("llama")
    model.model.layers[0].mlp.down_proj = nn.Linear(120, 64, bias=False)  # 120 % 16 != 0
    assert q.quantize_model(model, "int8", lm_head=False) == 2 * 7 - 1
    assert isinstance(model.lm_head, nn.Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert q.quantize_model(make_model("llama"), None) == q.quantize_model(make_model("llama"), "none") == 0


def test_missing_kernel_falls_back_to_the_plain_model(monkeypatch, caplog):
    monkeypatch.setattr(q, "int8_kernel_error", lambda device: "NotImplementedError: no kernel")
    model = make_model("llama")
    with caplog.at_level(logging.WARNING, logger=q.__name__):
        assert q.quantize_model(model, "int8") == 0
    assert "serving the unquantized model" in caplog.text
    assert isinstance(model.lm_head, nn.Linear)


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 6, 7, 16, 33])
@pytest.mark.parametrize("out_features", [16, 97])
def test_native_int8_is_the_dequantized_product_whatever_the_rows(bias, rows, out_features):
    """One register block widens int8 in registers, more widen the panel once into a buffer:
    the same floats in the same order, so a row's result does not depend on its step's rows."""
    torch.manual_seed(rows)
    lin = nn.Linear(72, out_features, bias=bias)
    layer = q.NativeInt8Linear.of(lin, KERNEL)
    qw, scales = q.quantize_weight(lin.weight)
    x = torch.randn(2, rows, 72)
    want = x @ (qw.float() * scales[:, None]).T + (lin.bias.detach() if bias else 0)
    got = layer(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer(x[:1, :1]), got[:1, :1])  # alone: bit for bit what it got in a batch
    assert rel_err(got, lin(x)) < 0.02
    assert tuple(layer.panels.shape) == (-(-out_features // 16), 72, 16) and layer.panels.dtype == torch.int8


@needs_kernel
def test_native_int8_takes_any_width_and_refuses_missing_scales():
    model = make_model("llama")
    model.model.layers[0].mlp.down_proj = nn.Linear(120, 64, bias=False)  # torch's kernel needs K % 16
    assert q.quantize_model(model, "int8", kernel=KERNEL) == 2 * 7 + 1
    assert isinstance(model.model.layers[0].mlp.down_proj, q.NativeInt8Linear)
    layer = model.lm_head
    with pytest.raises(RuntimeError, match="int8 panels need scales"):
        KERNEL.skinny_linear(torch.randn(2, layer.in_features), layer.panels, layer.out_features)
    assert "float32 CPU path" in q.native_int8_error(torch.zeros(1, dtype=torch.bfloat16), KERNEL)


def _greedy(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    reqs = [
        GenerateRequest(prompt_token_ids=p, fork=False, sampling=SamplingParams(max_tokens=n))
        for p in prompts
    ]
    return [list(o.branches[0].token_ids) for o in engine.generate(reqs)]


@pytest.mark.parametrize("native_kernels", [True, False])
def test_engine_int8_generates_greedily_and_frees_every_block(native_kernels):
    """The engine's int8 path is transformers' greedy generate on the same int8 model (closeness
    to fp32 is the test above: on a random model greedy drifts after a first difference); the
    native panels where the native kernels run, else torch's kernel."""
    tok = make_tokenizer(control_tokens=False)
    cfg = EngineConfig(block_size=4, num_blocks=64, quantization="int8", native_kernels=native_kernels)
    engine = Engine.from_model(make_model("llama"), tok, cfg)
    model = engine.runner.model
    kind = q.NativeInt8Linear if native_kernels and KERNEL is not None else q.Int8Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, kind)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 256, (k,), generator=g).tolist() for k in (5, 19, 33)]
    got = _greedy(engine, prompts, 16)
    for p, out in zip(prompts, got, strict=True):
        hf = ref.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert out == hf[0, len(p) :].tolist()
    stats = engine.stats()
    assert stats.free_blocks == stats.total_blocks and all(c == 0 for c in engine.pool.ref_counts)


def test_engine_refuses_an_unknown_quantization():
    with pytest.raises(ModelLoadError, match="quantization"):
        Engine.from_model(make_model("llama"), make_tokenizer(), EngineConfig(quantization="fp8"))
