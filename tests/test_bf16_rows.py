"""Int8 layers with bfloat16 rows (csrc/bf16_rows.cpp, `linear_kernel: bf16`, and `auto` on an
AVX512_BF16 CPU without AMX) against the dequantized product of bfloat16-rounded rows and the
float32-row panels; the choice and its fallback wherever the CPU has no AVX512_BF16."""

from __future__ import annotations

import pytest
import torch
from engine_utils import assert_greedy_is_hf_generate, make_model, make_tokenizer
from torch import nn

from apar_worker import quantization as q
from apar_worker.engine import Engine, EngineConfig
from apar_worker.native import native_module
from apar_worker.types import ModelLoadError

KERNEL = native_module()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no C++ compiler or ninja on this machine")
needs_bf16 = pytest.mark.skipif(
    KERNEL is None or not KERNEL.bf16_rows_available(), reason="this CPU has no AVX512_BF16"
)


def _engine(linear_kernel: str, quantization: str | None = "int8") -> Engine:
    cfg = EngineConfig(block_size=4, num_blocks=64, quantization=quantization, linear_kernel=linear_kernel)
    return Engine.from_model(make_model("llama"), make_tokenizer(control_tokens=False), cfg)


@needs_kernel
def test_pair_panels_hold_each_column_s_k_pairs_together():
    w = torch.randint(-127, 128, (40, 71), dtype=torch.int8)
    pairs = KERNEL.pack_panels_pairs(w)
    assert tuple(pairs.shape) == (3, 36, 32)  # 40 columns in 3 panels, K padded to 72
    p, c, j, t = 1, 5, 7, 1
    assert pairs[p, j, 2 * c + t] == w[p * 16 + c, 2 * j + t]
    assert pairs[2, :, 16:].abs().sum() == 0 and pairs[:, 35, 1::2].abs().sum() == 0  # padding


@needs_bf16
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 5, 9, 16, 17, 40])
@pytest.mark.parametrize("shape", [(16, 72), (97, 71), (48, 200)])
def test_bf16_rows_are_the_dequantized_product_of_rounded_rows(bias, rows, shape):
    """Rows rounded to bfloat16 once, weights exact, float32 sums: the float64 product of the
    same operands to float32's accuracy. A row alone gives what it got in a batch."""
    torch.manual_seed(rows)
    out_features, in_features = shape
    lin = nn.Linear(in_features, out_features, bias=bias)
    pairs, fma = q.NativeInt8Linear.of(lin, KERNEL, layout="pairs"), q.NativeInt8Linear.of(lin, KERNEL)
    qw, scales = q.quantize_weight(lin.weight)
    x = torch.randn(rows, in_features) * torch.logspace(-2, 1, rows)[:, None]  # rows of unlike sizes
    deq = (qw.double() * scales.double()[:, None]).T
    want = x.bfloat16().double() @ deq + (lin.bias.detach().double() if bias else 0)
    got = pairs(x)
    per_row = (got.double() - want).abs().amax(dim=1) / want.abs().amax(dim=1)
    assert per_row.max() < 1e-5
    assert torch.equal(pairs(x[-1:]), got[-1:]) and torch.equal(pairs(x[:1]), got[:1])
    exact = x.double() @ deq + (lin.bias.detach().double() if bias else 0)
    rounding = ((got.double() - exact).abs().amax(dim=1) / exact.abs().amax(dim=1)).max()
    assert 1e-5 < rounding < 2e-2  # bfloat16 rows indeed, and no worse than their rounding
    assert not torch.equal(got, fma(x))


@needs_bf16
def test_engine_gives_int8_bf16_rows_where_auto_finds_no_amx_and_decodes_like_its_model(monkeypatch):
    monkeypatch.setattr(KERNEL, "amx_available", lambda: False)
    engine = _engine("auto")
    assert engine.linear_kernel == "bf16"
    model = engine.runner.model
    assert model.model.layers[0].mlp.up_proj.layout == "pairs" and model.lm_head.layout == "pairs"
    assert_greedy_is_hf_generate(engine)
    assert _engine("native").runner.model.lm_head.layout == "panels"  # the float32-row path stays


@needs_kernel
def test_without_bf16_auto_keeps_float32_rows_and_bf16_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(KERNEL, "amx_available", lambda: False)
    monkeypatch.setattr(KERNEL, "bf16_rows_available", lambda: False)
    engine = _engine("auto")
    assert engine.linear_kernel == "native" and engine.runner.model.lm_head.layout == "panels"
    with pytest.raises(ModelLoadError, match="linear_kernel bf16 is unavailable: .*AVX512_BF16"):
        _engine("bf16")


def test_bf16_without_int8_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="needs quantization int8"):
        _engine("bf16", quantization=None)
