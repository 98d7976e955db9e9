"""Smoke test of `apar bench step` (bench/step.py) on a tiny random model: output and JSON
structure, positive figures, every KV block back. Step costs are not judged here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cluster.cli import main as apar

sys.path.insert(0, str(Path(__file__).parent))
from cluster_testkit import make_fork_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_fork_model(tmp_path_factory.mktemp("step-model"))


def test_bench_step_end_to_end(tiny_model, tmp_path, capsys):
    out, png = tmp_path / "step.json", tmp_path / "step.png"
    argv = ["bench", "step", "--model", str(tiny_model), "--tokens", "1,2,8,16", "--context", "40"]
    argv += ["--repeats", "2", "--threads", "1", "--bandwidth-mb", "16", "--quantization", "int8"]
    assert apar(argv + ["--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "16-token step / 1-token step (1 br/req):" in text
    assert "16-token step / 1-token step (8 br/req):" in text
    assert "1-token step / bandwidth floor:" in text and "\nint8 (" in text
    assert "floors allow" in text and "GFLOP/s" in text
    assert "host work (scheduling, metadata, sampling, rules) at 16 tokens, 8 br/req:" in text
    data = json.loads(out.read_text())
    assert data["benchmark"] == "step" and data["bandwidth_gbs"] > 0
    served = data["modes"][2]["linear_kernel"]  # amx: then float32 rows' int8 and fp32 on AMX too
    more = {"amx": ["int8", "none"], "bf16": ["int8"]}.get(served, [])  # bf16: then float32 rows' int8
    assert [m["quantization"] for m in data["modes"]] == ["none", "none", "int8", *more]
    kernels = [m["linear_kernel"] for m in data["modes"][2:]]
    assert kernels == {"amx": ["amx", "native", "amx"], "bf16": ["bf16", "native"]}.get(served, ["native"])
    assert [m["linear_kernel"] for m in data["modes"][:2]] == ["native", "plain"]
    assert data["modes"][1]["attention"] == "torch"
    assert "fp32 (C++ linears, C++ attention)" in text and "fp32 (plain torch ops) weights:" in text
    for mode in data["modes"]:
        assert mode["weight_bytes"] > 0 and mode["floor_ms"] > 0
        got = {(r["branches"], r["tokens"]): r for r in mode["rows"]}
        assert set(got) == {(1, 1), (1, 2), (1, 8), (1, 16), (8, 8), (8, 16)}  # 8 br/req needs T >= 8
        assert got[(8, 16)]["requests"] == 2 and got[(1, 16)]["requests"] == 16
        assert all(r["ms"] > 0 for r in mode["rows"])
        assert mode["ratios"]["over_1_token"]["1"]["1"] == pytest.approx(1.0)
        assert mode["ratios"]["one_token_over_floor"] > 0
        for r in mode["rows"]:  # host work is part of the step, not all of it
            assert 0 < r["host_ms"] < r["ms"]
        for r in mode["rows"]:  # the floor is the longer of the read and the arithmetic
            assert r["floor_ms"] == max(r["memory_ms"], r["compute_ms"]) > 0
            assert r["bound"] == ("compute" if r["compute_ms"] > r["memory_ms"] else "memory")
        if mode["linear_kernel"] != "amx" and mode["peak_gflops"] > 0:
            assert got[(1, 16)]["compute_ms"] == pytest.approx(16 * got[(1, 1)]["compute_ms"])
        assert got[(1, 16)]["memory_ms"] > got[(8, 16)]["memory_ms"]  # siblings read their prompt once
        floors = mode["ratios"]["floor_over_1_token_floor"]
        assert floors["1"]["1"] == pytest.approx(1.0) and floors["8"]["16"] >= 1.0
    fp32, plain, int8 = data["modes"][:3]
    assert fp32["weight_bytes"] == plain["weight_bytes"]  # packing moves the weights, it adds none
    assert int8["weight_bytes"] < fp32["weight_bytes"] / 2  # int8 weights (lm_head an int8 copy)
    assert [r["tokens"] for r in data["transformers"]] == [1, 2, 8, 16]
    assert all(r["ms"] > 0 for r in data["transformers"])
    assert png.stat().st_size > 1000


def test_bench_step_errors_are_one_line_exit_2(tiny_model, capsys):
    assert apar(["bench", "step", "--model", "no-such-model"]) == 2
    assert apar(["bench", "step", "--model", str(tiny_model), "--context", "5000", "--no-hf"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err
    with pytest.raises(SystemExit):
        apar(["bench", "step", "--tokens", "0,2"])


def test_step_floor_counts_smollm2s_flops_and_kv_bytes():
    """SmolLM2-135M: 30 layers of 576 / 1536 with 9 query and 3 KV heads of 64, 49152 words."""
    from types import SimpleNamespace

    from bench.step_floor import row_floor, step_cost_model

    config = SimpleNamespace(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
    )
    cost = step_cost_model(config, context=512, kv_bytes=4)
    linear = 30 * (576 * (576 + 2 * 192) + 576 * 576 + 3 * 576 * 1536) + 49152 * 576
    assert cost["flops"] == pytest.approx(2 * linear + 4 * 30 * 576 * 512)
    assert cost["kv_token_bytes"] == 30 * 2 * 192 * 4
    one = row_floor(cost, 540_000_000, tokens=1, requests=1, context=512, gbs=30.0, gflops=230.0)
    assert one["bound"] == "memory" and one["compute_ms"] < one["memory_ms"]
    sixteen = row_floor(cost, 540_000_000, tokens=16, requests=2, context=512, gbs=30.0, gflops=230.0)
    assert sixteen["bound"] == "compute" and sixteen["floor_ms"] == pytest.approx(16 * one["compute_ms"])
    assert step_cost_model(SimpleNamespace(hidden_size=8), 16, 4) is None  # not a Llama-style config
    assert row_floor(None, 1000, 4, 1, 16, 1.0, 100.0)["compute_ms"] == 0.0
