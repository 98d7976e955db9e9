"""Smoke tests of the benchmark harness (bench/): statistics, bounded Poisson arrivals, the speed
harness end to end on a tiny random-weight model, and CLI errors. Benchmarks are not timed here."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from apar_worker import native
from bench import common
from bench.common import BenchError
from bench.load import run_rate, summarize_rate
from bench.targets import Result
from cluster.cli import main as apar

sys.path.insert(0, str(Path(__file__).parent))
from cluster_testkit import make_fork_model  # noqa: E402


def test_percentile_matches_numpy_and_handles_empty():
    rng = random.Random(3)
    xs = [rng.expovariate(2.0) for _ in range(101)]
    for q in (0, 1, 50, 90, 99, 100):
        assert common.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    s = common.summarize([])
    assert all(math.isnan(v) for v in s.values())
    assert math.isnan(common.ratio(1.0, 0.0))
    with pytest.raises(ValueError):
        common.percentile(xs, 101)


def test_poisson_arrivals_are_bounded_in_count_and_time():
    arr = common.poisson_arrivals(rate=5.0, duration_s=200.0, max_requests=10_000, seed=1)
    assert all(0 < a <= 200.0 for a in arr)
    assert arr == sorted(arr)
    # 1000 expected; a Poisson count is within 5 sigma (~160) of its mean.
    assert abs(len(arr) - 1000) < 160
    capped = common.poisson_arrivals(rate=50.0, duration_s=100.0, max_requests=7, seed=1)
    assert len(capped) == 7
    assert common.poisson_arrivals(5.0, 200.0, 10_000, seed=1) == arr  # reproducible by seed
    with pytest.raises(ValueError):
        common.poisson_arrivals(0.0, 10.0, 5)


def test_run_rate_sends_every_arrival_once_and_summarizes():
    seen: list[str] = []

    def target(prompt: common.Prompt, max_tokens: int) -> Result:
        start = time.perf_counter()
        seen.append(prompt.id)
        time.sleep(0.01)
        ok = prompt.id != "p1"  # one prompt fails: it must be counted, not dropped
        return Result(ok, start, 0.002, time.perf_counter() - start, max_tokens if ok else 0, prompt.kind)

    prompts = [common.Prompt(f"p{i}", "structured", "x") for i in range(4)]
    results, window = run_rate(target, prompts, rate=40.0, duration_s=0.5, max_requests=12, max_tokens=5)
    n = len(common.poisson_arrivals(40.0, 0.5, 12, seed=40000))
    assert len(results) == len(seen) == n
    row = summarize_rate(results, window, 40.0)
    failed = sum(1 for i in range(n) if prompts[i % 4].id == "p1")
    assert row["failed"] == failed
    assert row["requests"] == n
    assert row["out_tok_s"] == pytest.approx(5 * (n - failed) / window)
    assert row["tpot_s"]["p50"] > 0


def test_engine_target_under_poisson_load(fork_model):
    """The in-process engine target (AsyncEngine, real model): TTFT before e2e, tokens counted."""
    from bench.targets import EngineTarget

    target = EngineTarget(str(fork_model), fork=True, timeout_s=60)
    try:
        prompts = common.mixed_prompts(None, 4)
        results, window = run_rate(target, prompts, rate=20.0, duration_s=0.4, max_requests=6, max_tokens=12)
    finally:
        target.close()
    assert results and all(r.ok for r in results)
    assert all(0 < r.ttft_s < r.e2e_s <= window for r in results)
    assert all(0 < r.tokens <= 12 for r in results)  # max_tokens bounds all branches together
    row = summarize_rate(results, window, 20.0)
    assert row["failed"] == 0 and row["out_tok_s"] > 0


def test_check_loopback_refuses_other_hosts():
    assert common.check_loopback("127.0.0.1:50051") == ("127.0.0.1", 50051)
    for bad in ("10.0.0.2:50051", "example.com:80", "127.0.0.1"):
        with pytest.raises(common.BenchError):
            common.check_loopback(bad)


def test_mixed_prompts_alternate_kinds():
    ps = common.mixed_prompts(None, 10)
    assert [p.kind for p in ps] == ["structured", "unstructured"] * 5
    assert len({p.id for p in ps}) == 10


@pytest.fixture(scope="module")
def fork_model(tmp_path_factory) -> Path:
    return make_fork_model(tmp_path_factory.mktemp("bench-model"))


def test_speed_harness_end_to_end(fork_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("APAR_VLLM_VENV", str(tmp_path / "no-venv"))  # vLLM rows skipped, with a note
    out, png = tmp_path / "speed.json", tmp_path / "speed.png"
    argv = ["bench", "speed", "--model", str(fork_model), "--baseline", str(fork_model)]
    argv += ["--num-prompts", "2", "--max-tokens", "24", "--json", str(out), "--plot", str(png)]
    assert apar(argv) == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "not installed" in printed
    data = json.loads(out.read_text())
    systems = data["systems"]
    assert set(systems) == {"apar", "twin", "twin-hf"}
    runs = {(r["system"], r["prompt_id"]): r for r in data["runs"]}
    for pid in {r["prompt_id"] for r in data["runs"]}:
        twin, hf, ap = runs[("twin", pid)], runs[("twin-hf", pid)], runs[("apar", pid)]
        assert twin["steps"] == twin["tokens"]  # sequential: one token per step
        assert hf["tokens"] == twin["tokens"]  # same greedy decode of the same ids
        assert ap["branches"] > 1 and ap["steps"] < ap["tokens"]  # it forked: several tokens a step
        assert ap["peak_blocks"] > 0 and ap["attended_tokens"] > 0
        assert ap["wall_s"] > 0 and twin["wall_s"] > 0
    speedups = [
        runs[("twin", p)]["wall_s"] / runs[("apar", p)]["wall_s"]
        for p in {r["prompt_id"] for r in data["runs"]}
    ]
    assert systems["apar"]["median_speedup_vs_twin"] == pytest.approx(common.median(speedups))
    assert systems["twin"]["median_speedup_vs_twin"] == pytest.approx(1.0)
    assert systems["twin-hf"]["same_text_as_twin"] == 1.0  # the harness decodes what the engine decodes
    assert png.stat().st_size > 1000


def test_speed_harness_with_speculation(fork_model, tmp_path, capsys):
    out = tmp_path / "speed.json"
    argv = [
        "bench",
        "speed",
        "--model",
        str(fork_model),
        "--baseline",
        str(fork_model),
        "--no-hf",
        "--no-vllm",
    ]
    argv += ["--no-llamacpp", "--num-prompts", "2", "--max-tokens", "40", "--json", str(out), "--plot", ""]
    argv += ["--quantization", "int8"]  # int8 rows do not depend on their step: drafts change no token
    assert apar(argv + ["--speculative", '{"method": "ngram", "num_speculative_tokens": 3}']) == 0
    assert "mean acceptance length" in capsys.readouterr().out
    data = json.loads(out.read_text())
    systems = data["systems"]
    assert set(systems) == {"apar", "apar-spec", "twin", "twin-spec"}
    assert data["settings"]["speculative"]["num_speculative_tokens"] == 3
    assert data["settings"]["quantization"] == "int8"
    runs = {(r["system"], r["prompt_id"]): r for r in data["runs"]}
    for pid in {r["prompt_id"] for r in data["runs"]}:
        assert runs[("twin-spec", pid)]["tokens"] == runs[("twin", pid)]["tokens"]
        assert runs[("twin-spec", pid)]["steps"] <= runs[("twin", pid)]["steps"]
        assert runs[("apar-spec", pid)]["tokens"] == runs[("apar", pid)]["tokens"]
    for name in ("apar-spec", "twin-spec"):
        assert (
            systems[name]["median_speedup_vs_no_spec"] > 0 and systems[name]["median_step_cost_vs_twin"] > 0
        )
    assert apar(argv + ["--speculative", '{"method": "eagle"}']) == 2


def test_burst_harness_end_to_end(fork_model, tmp_path, capsys):
    out = tmp_path / "burst.json"
    argv = ["bench", "burst", "--model", str(fork_model), "--baseline", str(fork_model)]
    argv += ["--num-requests", "6", "--num-blocks", "24", "--block-size", "4", "--max-tokens", "24"]
    assert apar(argv + ["--threads", "1", "--json", str(out)]) == 0
    assert "sooner than the twin" in capsys.readouterr().out
    data = json.loads(out.read_text())
    runs = {r["system"]: r for r in data["runs"]}
    assert set(runs) == {"apar", "twin"}
    for r in runs.values():
        assert r["pool_blocks"] == 24 and r["free_blocks_at_end"] == 24  # every block came back
        assert sum(r["finish_reasons"].values()) == 6 and r["truncated"] == 0
        assert 1 <= r["max_running"] <= 6 and 0 < r["mean_running"] <= r["max_running"]
        assert 0 < r["peak_blocks"] <= 24 and r["output_tokens"] > 0
    assert runs["twin"]["preemptions"] > 0, "24 blocks of 4 cannot hold 6 requests: the pool is the limit"
    q = data["ratios"]
    assert q["burst_time_twin_over_apar"] == pytest.approx(runs["twin"]["wall_s"] / runs["apar"]["wall_s"])
    assert apar(argv + ["--block-size", "12"]) == 2


def test_attention_bench_compares_both_paths(fork_model, tmp_path, capsys):
    out = tmp_path / "attention.json"
    argv = ["bench", "attention", "--model", str(fork_model), "--branches", "1,4", "--prompt-tokens", "32"]
    argv += ["--own-tokens", "4", "--block-size", "4", "--repeats", "1", "--threads", "1", "--json", str(out)]
    assert apar(argv) == 0
    assert "cascade / plain" in capsys.readouterr().out
    rows = {r["branches"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {1, 4}
    for r in rows.values():
        assert r["plain_ms"] > 0 and r["cascade_ms"] > 0 and r["max_abs_diff"] < 1e-4
        if native.native_module() is not None:  # the C++ path is compared as well
            assert r["native_ms"] > 0 and r["native_ratio"] > 0
    assert apar(argv[:-2] + ["--branches", "x"]) == 2


def test_bench_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert apar(["bench", "load", "--server", "10.1.2.3:50051"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loopback" in err[0]
    assert apar(["bench", "speed", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
    with pytest.raises(SystemExit) as exc:
        apar(["bench", "load", "--rate", "fast"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_vllm_head_padding_is_the_same_attention(tmp_path):
    """vLLM-CPU has no head_dim-48 kernel: the padded copy must compute the same scores and output."""
    import torch
    from engine_utils import make_model, make_tokenizer
    from safetensors.torch import load_file

    from bench.vllm_compat import needs_padding, pad_heads

    src = tmp_path / "src"
    make_model("llama").save_pretrained(src)  # 4 heads, 2 kv heads, head_dim 16
    make_tokenizer().save_pretrained(src)
    assert needs_padding(src)
    dst = pad_heads(src, tmp_path / "dst")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["head_dim"] == 32 and cfg["rope_parameters"]["partial_rotary_factor"] == pytest.approx(0.5)
    assert not needs_padding(dst) and (dst / "tokenizer.json").is_file()
    old, new = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    x = torch.randn(64)
    attn = "model.layers.1.self_attn."
    q0, q1 = (w[attn + "q_proj.weight"] @ x for w in (old, new))
    k0, k1 = (w[attn + "k_proj.weight"] @ x for w in (old, new))
    v0, v1 = (w[attn + "v_proj.weight"] @ x for w in (old, new))
    q0, q1, k0, k1 = q0.view(4, 16), q1.view(4, 32), k0.view(2, 16), k1.view(2, 32)
    assert torch.all(q1[:, 16:] == 0) and torch.all(k1[:, 16:] == 0)
    # head h uses kv head h // 2 (GQA): scaled scores agree
    s0 = torch.stack([q0[h] @ k0[h // 2] for h in range(4)]) / 16**0.5
    s1 = torch.stack([q1[h] @ k1[h // 2] for h in range(4)]) / 32**0.5
    torch.testing.assert_close(s1, s0)
    # the output projection of the (padded) values is unchanged
    heads_v0 = torch.cat([v0.view(2, 16)[h // 2] for h in range(4)])
    heads_v1 = torch.cat([v1.view(2, 32)[h // 2] for h in range(4)])
    torch.testing.assert_close(new[attn + "o_proj.weight"] @ heads_v1, old[attn + "o_proj.weight"] @ heads_v0)
    torch.testing.assert_close(new["model.embed_tokens.weight"], old["model.embed_tokens.weight"])


def test_llamacpp_peer_skips_cleanly_and_compares_token_prefixes(tmp_path, monkeypatch):
    from bench import llamacpp_peer as lc

    monkeypatch.setenv("APAR_LLAMACPP_DIR", str(tmp_path / "none"))
    reason = lc.skip_reason()
    assert reason and "scripts/install-llamacpp.sh" in reason and "skipped" in reason
    with pytest.raises(BenchError, match="install-llamacpp"):
        lc.LlamaServer(tmp_path / "m.gguf", 1, tmp_path / "log", ctx_per_slot=256).command()
    assert lc.gguf_file("smollm2-135m-instruct", lc.Q4).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert lc.same_prefix_share([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert lc.same_prefix_share([1, 2], [1, 2, 3]) == 1.0 and lc.same_prefix_share([], [1]) == 0.0
