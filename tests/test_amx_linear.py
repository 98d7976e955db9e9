"""Int8 layers on AMX tiles (csrc/amx_linear.cpp, `linear_kernel: amx`) against the FMA panels
and the dequantized product; the choice and its fallback wherever the CPU has no AMX."""

from __future__ import annotations

import pytest
import torch
from engine_utils import assert_greedy_is_hf_generate, make_model, make_tokenizer
from torch import nn

from apar_worker import quantization as q
from apar_worker.engine import Engine, EngineConfig
from apar_worker.native import native_module
from apar_worker.packed_linear import NativeLinear
from apar_worker.types import GenerateRequest, ModelLoadError, SamplingParams

KERNEL = native_module()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no C++ compiler or ninja on this machine")
needs_amx = pytest.mark.skipif(
    KERNEL is None or not KERNEL.amx_available(), reason="this CPU grants no AMX int8 tiles"
)


def _engine(linear_kernel: str) -> Engine:
    cfg = EngineConfig(block_size=4, num_blocks=64, quantization="int8", linear_kernel=linear_kernel)
    return Engine.from_model(make_model("llama"), make_tokenizer(control_tokens=False), cfg)


@needs_amx
def test_amx_tiles_hold_each_column_s_four_k_values_together():
    w = torch.randint(-127, 128, (40, 72), dtype=torch.int8)
    tiles = KERNEL.pack_panels_amx(w)
    assert tuple(tiles.shape) == (3, 128 // 4, 64)  # 40 columns in 3 panels, K padded to 128
    p, c, kq, j = 1, 5, 7, 2
    assert tiles[p, kq, c * 4 + j] == w[p * 16 + c, kq * 4 + j]
    assert tiles[2, :, 8 * 4 :].abs().sum() == 0 and tiles[:, 72 // 4 :].abs().sum() == 0  # padding


@needs_amx
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("shape", [(16, 72), (97, 72), (48, 200)])
def test_amx_int8_is_the_dequantized_product_whatever_the_rows(bias, rows, shape):
    """The rows' two int8 levels keep ~2^-16 of each row's largest value; the FMA panels keep
    float32 rows. A row's result does not depend on the rows that share its step."""
    torch.manual_seed(rows)
    out_features, in_features = shape
    lin = nn.Linear(in_features, out_features, bias=bias)
    amx, fma = q.NativeInt8Linear.of(lin, KERNEL, layout="amx"), q.NativeInt8Linear.of(lin, KERNEL)
    qw, scales = q.quantize_weight(lin.weight)
    x = torch.randn(rows, in_features) * torch.logspace(-2, 1, rows)[:, None]  # rows of unlike sizes
    want = x @ (qw.float() * scales[:, None]).T + (lin.bias.detach() if bias else 0)
    got = amx(x)
    per_row = (got - want).abs().amax(dim=1) / want.abs().amax(dim=1)
    assert per_row.max() < 1e-4
    assert (fma(x) - want).abs().max() < 1e-5 * want.abs().max()
    assert torch.equal(amx(x[-1:]), got[-1:])  # alone: bit for bit what it got in a batch
    assert not torch.equal(got, fma(x))  # a different path indeed: the rows were quantized


@needs_amx
def test_amx_refuses_rows_of_another_width():
    layer = q.NativeInt8Linear.of(nn.Linear(64, 32), KERNEL, layout="amx")
    with pytest.raises(RuntimeError, match="panels and rows disagree"):
        KERNEL.skinny_linear(torch.randn(2, 200), layer.panels, 32, None, layer.scales)


@needs_amx
def test_engine_puts_int8_on_amx_under_auto_and_its_greedy_output_is_its_models():
    engine = _engine("auto")
    assert engine.linear_kernel == "amx"
    model = engine.runner.model
    assert model.model.layers[0].mlp.up_proj.tiles and model.lm_head.tiles
    assert_greedy_is_hf_generate(engine)


@needs_kernel
def test_native_keeps_int8_on_the_fma_panels():
    engine = _engine("native")
    assert engine.linear_kernel == "native"
    assert not engine.runner.model.model.layers[0].self_attn.q_proj.tiles


@needs_kernel
def test_without_amx_auto_falls_back_and_amx_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(KERNEL, "amx_available", lambda: False)
    engine = _engine("auto")
    assert engine.linear_kernel != "amx" and not engine.runner.model.lm_head.tiles
    with pytest.raises(ModelLoadError, match="linear_kernel amx is unavailable: .*no AMX"):
        _engine("amx")


@needs_amx
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 16, 33])
@pytest.mark.parametrize("shape", [(16, 64), (97, 72), (48, 200)])
def test_amx_float_layers_keep_float32_to_about_1e5(bias, rows, shape):
    """bfloat16 hi + lo for weights and rows, three tile products: 16 significant bits per
    operand, so within ~1e-5 of float32 where one bfloat16 product is off by ~1e-2."""
    torch.manual_seed(rows)
    out_features, in_features = shape
    lin = nn.Linear(in_features, out_features, bias=bias)
    layer = NativeLinear(lin, KERNEL, tiles=True)
    assert layer.panels.dtype == torch.bfloat16 and layer.panels.shape[0] == -(-out_features // 16)
    x = torch.randn(rows, in_features)
    want = lin(x)
    got = layer(x)
    assert (got - want).abs().max() < 2e-5 * want.abs().max()
    one = x.bfloat16().float() @ lin.weight.detach().bfloat16().float().T + (lin.bias.detach() if bias else 0)
    assert (one - want).abs().max() > 10 * (got - want).abs().max()  # far closer than plain bf16
    assert torch.equal(layer(x[-1:]), got[-1:])  # alone: bit for bit what it got in a batch


@needs_amx
def test_engine_amx_packs_float_layers_on_tiles_and_decodes_like_native():
    tok = make_tokenizer(control_tokens=False)

    def run(kernel: str) -> tuple[Engine, list[list[int]]]:
        cfg = EngineConfig(block_size=4, num_blocks=64, linear_kernel=kernel)
        engine = Engine.from_model(make_model("llama", seed=5), tok, cfg)
        reqs = [
            GenerateRequest(
                prompt_token_ids=[5 + i, 9, 11, 3 * i + 4], fork=False, sampling=SamplingParams(max_tokens=10)
            )
            for i in range(3)
        ]
        return engine, [list(o.branches[0].token_ids) for o in engine.generate(reqs)]

    amx, got = run("amx")
    assert amx.linear_kernel == "amx" and amx.runner.model.model.layers[0].mlp.up_proj.KIND == "amx"
    assert amx.stats().free_blocks == amx.stats().total_blocks
    native, want = run("native")
    assert native.runner.model.model.layers[0].mlp.up_proj.KIND == "native"
    assert got == want


@needs_kernel
def test_amx_for_float_layers_is_a_clear_error_without_amx(monkeypatch):
    monkeypatch.setattr(KERNEL, "amx_available", lambda: False)
    with pytest.raises(ModelLoadError, match="linear_kernel amx is unavailable: .*no AMX"):
        Engine.from_model(make_model("llama"), make_tokenizer(), EngineConfig(linear_kernel="amx"))
