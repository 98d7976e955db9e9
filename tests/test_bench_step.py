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
