"""Checks of the int8 weights (`quantization: int8`) on a real model, run by hand:

    python -m bench.int8_check agreement --model smollm2-135m-instruct   # greedy tokens vs fp32
    python -m bench.int8_check layers                                    # one layer's time vs rows
    python -m bench.int8_check steps --rows 1,16 --branches 1            # fp32 vs int8 engine steps

`agreement`: fp32 and int8 engines decode the same held-out prompts greedily (no forks). Three
shares: `aligned` (position by position over all generated tokens: an early drift counts every
later token as different), `prefix` (tokens before the first difference), `forced` (the int8
model's greedy pick at each position of fp32's own output, one forward per prompt: per-token
agreement, free of drift). `layers`: microseconds of one SmolLM2-sized linear layer (1536x576,
576x1536) at m rows, fp32 `F.linear` vs `Int8Linear`'s two paths, weights cycled through 48
copies so that they come from memory, not cache (best of 7). `steps`: an fp32 and an int8
engine on the same decode rows (`apar bench step`'s setup) stepping in turn, median ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from bench.common import load_prompts


def _engine(model: str, quantization: str | None, lm_head: bool, linear_kernel: str = "auto"):
    """An engine on `model`, quantized here so that the lm_head choice can be measured too: on
    the layers the engine serves int8 with under `linear_kernel` (auto: AMX tiles, else
    bfloat16 rows, else the FMA panels; native: the panels)."""
    from apar_worker.engine import Engine, EngineConfig
    from apar_worker.model_runner import load_model_and_tokenizer
    from apar_worker.native import native_module
    from apar_worker.quantization import int8_layout, quantize_model

    hf_model, tokenizer = load_model_and_tokenizer(model, torch.device("cpu"), torch.float32)
    kernel = native_module()
    layout = int8_layout(next(hf_model.parameters()), kernel, linear_kernel)
    quantize_model(hf_model, quantization, lm_head=lm_head, kernel=kernel, layout=layout)
    return Engine.from_model(hf_model, tokenizer, EngineConfig(model=model, max_model_len=2048))


def _generate(engine, prompts, max_tokens: int) -> list[list[int]]:
    from apar_worker.types import GenerateRequest, SamplingParams

    reqs = [
        GenerateRequest(messages=p.messages(), fork=False, sampling=SamplingParams(max_tokens=max_tokens))
        for p in prompts
    ]
    return [list(o.branches[0].token_ids) for o in engine.generate(reqs)]


@torch.no_grad()
def _forced(engine, prompts, outs: list[list[int]]) -> tuple[int, int]:
    """Teacher-forced top-1 matches of `engine`'s model on fp32's outputs (plain HF forward)."""
    from apar_worker.types import GenerateRequest

    same = total = 0
    model = engine.runner.model
    model.set_attn_implementation("sdpa")
    for p, out in zip(prompts, outs, strict=True):
        ids = engine.tokenize(GenerateRequest(messages=p.messages())) + out
        logits = model(torch.tensor([ids])).logits[0, -len(out) - 1 : -1]
        same += int((logits.argmax(-1) == torch.tensor(out)).sum())
        total += len(out)
    return same, total


def measure(
    model: str, num_prompts: int, max_tokens: int, lm_head: bool = True, linear_kernel: str = "auto"
) -> dict[str, Any]:
    prompts = load_prompts(None, limit=num_prompts)
    ref = _generate(_engine(model, None, True), prompts, max_tokens)
    int8 = _engine(model, "int8", lm_head, linear_kernel)
    got = _generate(int8, prompts, max_tokens)
    aligned = sum(sum(a == b for a, b in zip(r, g, strict=False)) for r, g in zip(ref, got, strict=True))
    prefix = 0
    for r, g in zip(ref, got, strict=True):
        prefix += next((i for i, (a, b) in enumerate(zip(r, g, strict=False)) if a != b), min(len(r), len(g)))
    total = sum(max(len(r), len(g)) for r, g in zip(ref, got, strict=True))
    same, forced_total = _forced(int8, prompts, ref)
    return {
        "model": model,
        "prompts": len(prompts),
        "max_tokens": max_tokens,
        "lm_head_int8": lm_head,
        "int8_layout": next((m.layout for m in int8.runner.model.modules() if hasattr(m, "layout")), "torch"),
        "aligned": aligned / total,
        "prefix": prefix / total,
        "forced": same / forced_total,
        "identical_outputs": sum(r == g for r, g in zip(ref, got, strict=True)),
    }


def _best_us(fn, n: int, reps: int = 7) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def layers(rows: list[int], copies: int = 48) -> list[dict[str, Any]]:
    import torch.nn.functional as F

    from apar_worker import quantization as q

    out = []
    limit = q.KERNEL_MAX_ROWS
    try:
        for n_out, n_in in ((1536, 576), (576, 1536)):
            ws = [torch.randn(n_out, n_in) * 0.05 for _ in range(copies)]
            qs = [q.Int8Linear(w) for w in ws]
            for m in rows:
                x = torch.randn(m, n_in)
                row = {"shape": f"{n_out}x{n_in}", "m": m}
                row["fp32_us"] = _best_us(lambda i, x=x, ws=ws: F.linear(x, ws[i]), copies)
                q.KERNEL_MAX_ROWS = 10**9
                row["int8_kernel_us"] = _best_us(lambda i, x=x, qs=qs: qs[i](x), copies)
                q.KERNEL_MAX_ROWS = 0
                row["int8_matmul_us"] = _best_us(lambda i, x=x, qs=qs: qs[i](x), copies)
                q.KERNEL_MAX_ROWS = limit
                print(json.dumps(row), flush=True)
                out.append(row)
    finally:
        q.KERNEL_MAX_ROWS = limit
    return out


def steps(model: str, rows: int, branches: int, n: int = 12) -> dict[str, float]:
    """Median ms of an fp32 and an int8 engine stepping in turn on the same rows (bench.step's
    setup): drift in machine load hits both alike."""
    import statistics

    from apar_worker.engine import Engine, EngineConfig
    from bench import step as st

    engines = {}
    for q in ("none", "int8"):
        cfg = EngineConfig(
            model=model, quantization=q, num_blocks=rows * 80 + 64, max_num_batched_tokens=4096
        )
        e = engines[q] = Engine(cfg)
        st._add_requests(e, rows // branches, 512, seed=branches)
        st._prefill(e, rows // branches)
        if branches > 1:
            st._fork_siblings(e, branches)
        e.step()
    times: dict[str, list[float]] = {q: [] for q in engines}
    for _ in range(n):
        for q, e in engines.items():
            t = time.perf_counter()
            e.step()
            times[q].append((time.perf_counter() - t) * 1000)
    return {f"{q}_ms": statistics.median(v) for q, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("check", choices=["agreement", "layers", "steps"])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rows", default="1,4,8,16,32", help="layers: m values; steps: decode rows")
    p.add_argument("--branches", type=int, default=1, help="steps: branches per request")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fp32-lm-head", action="store_true", help="agreement: keep the output projection fp32")
    p.add_argument(
        "--linear-kernel", default="auto", help="agreement: int8 layers' kernel (auto, native, amx, bf16)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.check == "layers":
        layers([int(m) for m in args.rows.split(",")])
        return 0
    if args.check == "steps":
        for rows in (int(m) for m in args.rows.split(",")):
            print(
                json.dumps(
                    {"rows": rows, "branches": args.branches, **steps(args.model, rows, args.branches)}
                )
            )
        return 0
    res = measure(args.model, args.prompts, args.max_tokens, not args.fp32_lm_head, args.linear_kernel)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
