"""`apar bench burst`: memory-bound serving, APAR vs the twin in the same fixed KV pool.

A burst of structured requests arrives at once into a KV pool too small for all of them.
The pool, not compute, then decides how many requests run together: a system that holds
fewer blocks per request runs more of them at once, preempts less and finishes the burst
sooner (the APAR paper's serving gain). Both systems run on our engine, one after the other,
with the same prompts, pool size (MB) and settings; greedy.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from apar_worker.types import DEFAULT_BLOCK_SIZE
from bench.common import (
    RESULTS_DIR,
    BenchError,
    load_prompts,
    machine,
    model_pair,
    ratio,
    table,
    torch_threads,
    write_json,
)

APAR, TWIN = "apar", "twin"


@dataclass
class BurstRun:
    system: str
    requests: int
    pool_blocks: int
    block_size: int
    wall_s: float = 0.0
    steps: int = 0
    output_tokens: int = 0
    max_running: int = 0  # requests running together, most at any step
    mean_running: float = 0.0  # ... averaged over the steps
    preemptions: int = 0
    peak_blocks: int = 0
    free_blocks_at_end: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    truncated: int = 0  # ended "length" before reaching max_tokens, with an error, or rejected

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else float("nan")


def run_burst(engine: Any, system: str, prompts: list[list[int]], max_tokens: int, fork: bool) -> BurstRun:
    """All requests added at once; step until every one has its RequestOutput."""
    from apar_worker.types import GenerateRequest, RequestOutput, SamplingParams

    reqs = [
        GenerateRequest(
            prompt_token_ids=ids,
            fork=fork,
            request_id=f"{system}-{i}",
            sampling=SamplingParams(max_tokens=max_tokens),
        )
        for i, ids in enumerate(prompts)
    ]
    pool, sch = engine.pool, engine.scheduler
    run = BurstRun(system, len(reqs), pool.num_blocks, engine.kv.block_size)
    preempted_before = sch.num_preemptions
    done: dict[str, Any] = {}
    running_sum = 0
    start = time.perf_counter()
    for req in reqs:
        engine.add_request(req)
    while len(done) < len(reqs):
        for item in engine.step():
            if isinstance(item, RequestOutput):
                done[item.request_id] = item
        run.steps += 1
        running_sum += len(sch.running)
        run.max_running = max(run.max_running, len(sch.running))
        run.peak_blocks = max(run.peak_blocks, pool.num_blocks - pool.num_free)
    run.wall_s = time.perf_counter() - start
    run.mean_running = running_sum / max(1, run.steps)
    run.preemptions = sch.num_preemptions - preempted_before
    run.free_blocks_at_end = pool.num_free
    outs = list(done.values())
    run.output_tokens = sum(o.num_tokens for o in outs)
    run.finish_reasons = dict(Counter(o.finish_reason for o in outs))
    run.truncated = sum(
        1
        for o in outs
        if o.error
        or o.finish_reason not in ("stop", "length")
        or (o.finish_reason == "length" and o.num_tokens < max_tokens)
    )
    return run


def _system(args: argparse.Namespace, system: str, path: Path, fork: bool, prompts: list) -> BurstRun:
    """One system's burst on a fresh engine with the fixed pool."""
    from apar_worker.engine import Engine, EngineConfig
    from bench.speed import prompt_ids

    engine = Engine(
        EngineConfig(
            model=str(path),
            device="cpu",
            kv_cache_memory_mb=args.kv_mb,
            num_blocks=args.num_blocks,  # None: sized from kv_mb
            block_size=args.block_size,
            enable_prefix_caching=False,  # every request pays for its own prompt, in both systems
        )
    )
    ids = [prompt_ids(engine, p) for p in prompts]
    print(f"{system}: {len(ids)} requests into {engine.pool.num_blocks} blocks ...", flush=True)
    return run_burst(engine, system, ids, args.max_tokens, fork)


def run(args: argparse.Namespace) -> dict[str, Any]:
    apar_dir, twin_dir = model_pair(args)
    prompts = load_prompts(args.prompts, kind="structured")
    prompts = [prompts[i % len(prompts)] for i in range(args.num_requests)]
    with torch_threads(args.threads):
        runs = [_system(args, APAR, apar_dir, True, prompts), _system(args, TWIN, twin_dir, False, prompts)]
    a, t = runs
    return {
        "benchmark": "burst",
        "machine": machine(),
        "settings": {
            "model": args.model,
            "baseline": args.baseline,
            "num_requests": args.num_requests,
            "kv_mb": args.kv_mb,
            "num_blocks": a.pool_blocks,
            "block_size": args.block_size,
            "max_tokens": args.max_tokens,
            "threads": args.threads,
            "greedy": True,
        },
        "runs": [asdict(r) | {"tok_s": r.tok_s} for r in runs],
        "ratios": {
            "burst_time_twin_over_apar": ratio(t.wall_s, a.wall_s),
            "tok_s_apar_over_twin": ratio(a.tok_s, t.tok_s),
            "max_running_apar_over_twin": ratio(a.max_running, t.max_running),
            "mean_running_apar_over_twin": ratio(a.mean_running, t.mean_running),
        },
        "_runs": runs,
    }


def print_report(result: dict[str, Any]) -> None:
    runs: list[BurstRun] = result["_runs"]
    heads = ["system", "pool blocks", "max running", "mean running", "preemptions", "steps"]
    heads += ["wall s", "out tok/s", "truncated", "free at end"]
    rows = [
        [r.system, r.pool_blocks, r.max_running, r.mean_running, r.preemptions, r.steps, r.wall_s, r.tok_s]
        + [r.truncated, f"{r.free_blocks_at_end}/{r.pool_blocks}"]
        for r in runs
    ]
    print(table(heads, rows))
    q = result["ratios"]
    print(
        f"APAR finished the burst {q['burst_time_twin_over_apar']:.2f}x sooner than the twin "
        f"(output tok/s {q['tok_s_apar_over_twin']:.2f}x; requests running together: "
        f"max {q['max_running_apar_over_twin']:.2f}x, mean {q['mean_running_apar_over_twin']:.2f}x)"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="apar-smol", help="APAR model (shipped name or HF dir)")
    p.add_argument("--baseline", default=None, help="the twin (default: the APAR model's base)")
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl", help="default: the held-out split")
    p.add_argument("--num-requests", type=int, default=32, metavar="N")
    p.add_argument("--kv-mb", type=int, default=64, help="the KV pool of each system, MB (default 64)")
    p.add_argument("--num-blocks", type=int, default=None, help="the pool in blocks (overrides --kv-mb)")
    p.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per KV block (4, 8, 16 or 32)"
    )
    p.add_argument("--max-tokens", type=int, default=320, metavar="N")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(RESULTS_DIR / "burst.json"), metavar="OUT")


def main(args: argparse.Namespace) -> int:
    from apar_worker.types import BLOCK_SIZES

    if min(args.num_requests, args.kv_mb, args.num_blocks or 1, args.max_tokens, args.threads) < 1:
        raise BenchError("--num-requests, --kv-mb, --num-blocks, --max-tokens and --threads must be positive")
    if args.block_size not in BLOCK_SIZES:
        raise BenchError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}")
    result = run(args)
    print()
    print_report(result)
    result.pop("_runs")
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return 0
