"""`apar bench step`: what one engine step costs as its token count T grows (issue 14).

APAR saves steps only if a step feeding many branches costs about a one-token step. Each row
is the median wall time of the engine's real `Engine.step()` with T decode rows over a
`--context`-token context: with 1 branch per request the rows are T requests (distinct
prompts); with 8 branches per request, T/8 requests whose 8 sibling branches share the prompt
blocks (forked as `[Fork]` forks). Next to them: `transformers`' own forward of T rows (batch
T, one new token each, a DynamicCache of `--context` tokens per row) and the bandwidth floor,
the step's weight bytes over the memory bandwidth measured in the same run (a big tensor copy).
The engine runs as it serves (float32 linears in the C++ kernel's panels, or pre-packed for
oneDNN, apar_worker/packed_linear.py, C++ decode attention, apar_worker/native.py) and again on torch
ops alone (`linear_kernel: plain`, `native_kernels: false`), the reference path.

The prompts are prefilled through the first decoder layer only (the K/V values of the other
layers stay zero): a decode step's cost does not depend on the values, and a full prefill of
64 x 512 tokens would take minutes on a small CPU. Contexts grow by one token per timed step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    BenchError,
    machine,
    model_dir,
    torch_threads,
    write_json,
)
from bench.step_floor import bandwidth_gbs, peak_gflops, row_floor, step_cost_model, weight_bytes
from bench.step_host import ForwardClock
from bench.step_report import BRANCHES, plot, print_report


@contextlib.contextmanager
def first_layer_only(model):
    """Run the model with its first decoder layer alone (fast prefill; see the module doc)."""
    from torch import nn

    body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    name = next((n for n in ("layers", "h") if isinstance(getattr(body, n, None), nn.ModuleList)), None)
    if name is None:
        yield  # an unknown layout: a full prefill
        return
    layers = getattr(body, name)
    setattr(body, name, layers[:1])
    try:
        yield
    finally:
        setattr(body, name, layers)


def _add_requests(engine, n: int, context: int, seed: int) -> list:
    import torch

    from apar_worker.types import GenerateRequest, SamplingParams

    gen = torch.Generator().manual_seed(seed)
    low = min(100, engine.vocab_size // 2)
    sampling = SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True)
    ids = []
    for i in range(n):
        prompt = torch.randint(low, engine.vocab_size, (context,), generator=gen).tolist()
        req = GenerateRequest(
            prompt_token_ids=prompt, fork=False, sampling=sampling, request_id=f"s{seed}-{i}"
        )
        engine.add_request(req)
        ids.append(req.request_id)
    return ids


def _prefill(engine, n_rows: int) -> None:
    """Step (first layer only) until every running branch has one pending token."""
    with first_layer_only(engine.runner.model):
        for _ in range(10_000):
            engine.step()
            if engine.scheduler.num_preemptions:
                raise BenchError("a request was preempted during the prefill: the KV pool is too small")
            states = list(engine.requests.values())
            if all(b.num_pending == 1 for s in states for b in s.live_branches()):
                if sum(len(s.live_branches()) for s in states) == n_rows:
                    return
        raise BenchError("prefill did not finish (KV pool too small?)")


def _fork_siblings(engine, branches: int) -> None:
    """Give every request `branches` sibling branches over its prompt, as `[Fork]` would."""
    rules = engine.rules
    if rules.ids.child is None:  # a base model has no [Child]: any id serves for timing
        rules.ids.child = engine.vocab_size - 1
    for state in engine.requests.values():
        for _ in range(branches - 1):
            rules.fork(state, state.root, [])


def _timed(engine, rows: int, repeats: int, clock: ForwardClock) -> tuple[float, float]:
    """Median ms of `repeats` engine steps after one warm-up, and the median ms of each outside
    the model (host work); each must sample `rows` tokens."""
    times, host = [], []
    for i in range(repeats + 1):
        clock.take()
        t = time.perf_counter()
        out = engine.step()
        dt = time.perf_counter() - t
        model = clock.take()
        sampled = sum(len(getattr(e, "new_token_ids", ())) for e in out)
        if sampled != rows:
            raise BenchError(f"a step sampled {sampled} rows, expected {rows} (preempted? raise the KV pool)")
        if i:
            times.append(dt * 1000)
            host.append((dt - model) * 1000)
    return statistics.median(times), statistics.median(host)


def engine_rows(engine, tokens: list[int], branches: int, context: int, repeats: int) -> list[dict]:
    """One row per T (largest first: fewer requests are kept by aborting the rest)."""
    usable = sorted((t for t in tokens if t % branches == 0), reverse=True)
    if not usable:
        return []
    ids = _add_requests(engine, usable[0] // branches, context, seed=branches)
    _prefill(engine, usable[0] // branches)
    if branches > 1:
        _fork_siblings(engine, branches)
        engine.step()  # the children's [Fork] + [Child] tokens
    out = []
    with ForwardClock(engine) as clock:
        for t in usable:
            for rid in ids[t // branches :]:
                engine.abort(rid)
            ms, host = _timed(engine, t, repeats, clock)
            out.append(
                {"tokens": t, "branches": branches, "requests": t // branches, "ms": ms, "host_ms": host}
            )
    for rid in ids:
        engine.abort(rid)
    engine.step()
    return sorted(out, key=lambda r: r["tokens"])


def hf_rows(model_dir: Path, tokens: list[int], context: int, repeats: int) -> list[dict]:
    """`transformers` forward of T rows x 1 token, each over its own `context`-token DynamicCache."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    vocab = model.config.get_text_config().vocab_size
    prompt = torch.randint(
        min(100, vocab // 2), vocab, (1, context), generator=torch.Generator().manual_seed(0)
    )
    out = []
    with torch.no_grad():
        base = DynamicCache(config=model.config)
        model(input_ids=prompt, cache=base, use_cache=True, logits_to_keep=1)
        for t in tokens:
            cache = copy.deepcopy(base)
            cache.batch_repeat_interleave(t)
            ids = torch.full((t, 1), 7 % vocab)
            pos = torch.full((t, 1), context)
            times = []
            for i in range(repeats + 1):
                start = time.perf_counter()
                model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
                if i:
                    times.append((time.perf_counter() - start) * 1000)
                cache.crop(-1)  # drop the token just appended
            out.append({"tokens": t, "ms": statistics.median(times)})
    return out


def _mode(
    model_dir: Path,
    quantization: str | None,
    plain: bool,
    args: argparse.Namespace,
    gbs: float,
    kernel: str = "auto",
) -> dict:
    """One engine's rows: as it serves (`plain=False`, linears by `kernel`), or on torch ops
    alone (`plain=True`)."""
    from apar_worker.engine import Engine, EngineConfig

    rows_max = max(args.tokens)
    growth = len(args.tokens) * (args.repeats + 1) + 4
    block_size = EngineConfig.block_size
    per_row = -(-(args.context + growth) // block_size) + 2
    cfg = EngineConfig(
        model=str(model_dir),
        device="cpu",
        quantization=quantization,
        linear_kernel="plain" if plain else kernel,
        native_kernels=not plain,
        num_blocks=rows_max * per_row + 16,
        max_num_batched_tokens=max(4096, rows_max),
        max_num_seqs=max(128, rows_max),
    )
    engine = Engine(cfg)
    if args.context + growth >= engine.max_model_len:
        raise BenchError(f"--context {args.context} does not fit the model's {engine.max_model_len} tokens")
    wbytes = weight_bytes(engine.runner.model)
    rows = [r for b in BRANCHES for r in engine_rows(engine, args.tokens, b, args.context, args.repeats)]
    if engine.kv.num_free != engine.kv.num_blocks:
        raise BenchError("KV blocks leaked after the step benchmark")
    floor = wbytes / (gbs * 1e9) * 1000
    from apar_worker.native import native_module

    cost = step_cost_model(
        engine.runner.model.config, args.context, engine.runner.kv_cache.data.element_size()
    )
    # AMX tiles outrun the FMA chains measured: no compute floor for them (the read bounds them)
    native = native_module() if engine.linear_kernel != "amx" else None
    gflops = peak_gflops(native, bf16=engine.linear_kernel == "bf16")
    for r in rows:
        r.update(row_floor(cost, wbytes, r["tokens"], r["requests"], args.context, gbs, gflops))
    return {
        "peak_gflops": gflops,
        "quantization": quantization or "none",
        "linear_kernel": engine.linear_kernel,
        "attention": "native" if engine.runner.native is not None else "torch",
        "weight_bytes": wbytes,
        "floor_ms": floor,
        "rows": rows,
    }


def ratios(mode: dict) -> dict[str, Any]:
    """T-token step / 1-token step (per branches-per-request) and 1-token step / floor."""
    one = next((r["ms"] for r in mode["rows"] if r["tokens"] == 1 and r["branches"] == 1), None)
    per_t = {
        str(b): {str(r["tokens"]): r["ms"] / one for r in mode["rows"] if r["branches"] == b}
        for b in BRANCHES
        if one
    }
    floor_one = next((r["floor_ms"] for r in mode["rows"] if r["tokens"] == 1 and r["branches"] == 1), None)
    floors = {  # what the floors allow: the least T-token / 1-token ratio on this machine
        str(b): {str(r["tokens"]): r["floor_ms"] / floor_one for r in mode["rows"] if r["branches"] == b}
        for b in BRANCHES
        if floor_one
    }
    return {
        "over_1_token": per_t,
        "one_token_over_floor": one / mode["floor_ms"] if one else None,
        "floor_over_1_token_floor": floors,
    }


def _amx() -> bool:
    from apar_worker.native import native_module

    kernel = native_module()
    return kernel is not None and kernel.amx_available()


def run(args: argparse.Namespace) -> dict[str, Any]:
    path = model_dir(args.model)
    with torch_threads(args.threads):
        gbs = bandwidth_gbs(args.bandwidth_mb)
        modes = [_mode(path, None, False, args, gbs)]
        served = modes[0]
        if not args.no_plain and (served["linear_kernel"], served["attention"]) != ("plain", "torch"):
            modes.append(_mode(path, None, True, args, gbs))  # the reference path, same run
        if args.quantization == "int8":
            modes.append(_mode(path, "int8", False, args, gbs))
            if modes[-1]["linear_kernel"] in ("amx", "bf16"):  # and int8 with float32 rows, same run
                modes.append(_mode(path, "int8", False, args, gbs, kernel="native"))
        if served["linear_kernel"] == "native" and _amx():  # float32 on AMX tiles (opt-in), same run
            modes.append(_mode(path, None, False, args, gbs, kernel="amx"))
        hf = [] if args.no_hf else hf_rows(path, args.tokens, args.context, args.repeats)
    for mode in modes:
        mode["ratios"] = ratios(mode)
    settings = {
        k: getattr(args, k) for k in ("model", "threads", "context", "tokens", "repeats", "quantization")
    }
    return {
        "benchmark": "step",
        "machine": machine(),
        "settings": settings,
        "bandwidth_gbs": gbs,
        "modes": modes,
        "transformers": hf,
    }


def _tokens(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("token counts must be positive")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="model name or HF directory")
    p.add_argument("--tokens", type=_tokens, default=[1, 2, 4, 8, 16, 32, 64], metavar="T,T,...")
    p.add_argument("--context", type=int, default=512, help="context tokens of every decode row")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per row (median)")
    p.add_argument("--quantization", choices=["none", "int8"], default="none", help="int8: also int8 rows")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--bandwidth-mb", type=int, default=256, help="MiB copied to measure bandwidth")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers forward")
    p.add_argument("--no-plain", action="store_true", help="skip the plain torch-ops fp32 reference rows")
    p.add_argument("--json", default=str(RESULTS_DIR / "step.json"), metavar="OUT")
    p.add_argument("--plot", default=str(RESULTS_DIR / "step.png"), metavar="OUT.png")


def main(args: argparse.Namespace) -> int:
    if min(args.context, args.repeats, args.threads, args.bandwidth_mb) < 1:
        raise BenchError("--context, --repeats, --threads and --bandwidth-mb must be positive")
    result = run(args)
    print_report(result)
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    if args.plot:
        wrote = plot(result, Path(args.plot))
        print(f"wrote {args.plot}" if wrote else "plot skipped: matplotlib is not installed")
    return 0
