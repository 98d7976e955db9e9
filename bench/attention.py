"""`apar bench attention`: one decode step's attention, per-branch gather vs shared-prefix cascade.

N sibling branches of one request decode over a shared prompt; each also has its own tokens.
The plain path gathers every branch's whole context in every layer; the cascade path attends
all branches' queries to the shared prompt once and each branch to its own blocks
(apar_worker/cascade.py). The model's attention shape (layers, heads, KV heads, head size) is
read from its config; the cache holds random values (attention cost does not depend on them).
A third path, where the C++ kernel builds (apar_worker/native.py), is what the engine runs on
CPU: each branch's own blocks through the kernel, read in place, and the prompt through the
cascade. All paths' outputs are compared in the same run.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from apar_worker.types import DEFAULT_BLOCK_SIZE
from bench.common import RESULTS_DIR, BenchError, machine, model_dir, ratio, table, torch_threads, write_json


def _setup(shape: dict[str, int], branches: int, prompt: int, own: int, bs: int):
    import torch

    from apar_worker.attention import SeqSlice
    from apar_worker.kv_cache import KVCache

    n_prompt = -(-prompt // bs)
    per_branch = -(-(prompt + own + 1) // bs) - n_prompt + 1
    cache = KVCache(
        shape["layers"], n_prompt + branches * per_branch, bs, shape["kv_heads"], shape["head_dim"],
        torch.float32, torch.device("cpu"),
    )  # fmt: skip
    cache.data.normal_()
    seqs, nxt = [], n_prompt
    for i in range(branches):
        ctx = prompt + own + i % 4  # siblings of slightly different lengths
        mine = -(-(ctx + 1) // bs) - n_prompt
        seqs.append(SeqSlice(i, i + 1, list(range(n_prompt)) + list(range(nxt, nxt + mine)), ctx))
        nxt += mine
    return cache, seqs


def measure(shape: dict[str, int], n: int, args: argparse.Namespace) -> dict[str, Any]:
    """ms of one step's attention over every layer, each path; and their largest difference."""
    import torch

    from apar_worker.attention import FORWARD_CONTEXT, AttentionMetadata, paged_attention
    from apar_worker.native import native_module

    cache, seqs = _setup(shape, n, args.prompt_tokens, args.own_tokens, args.block_size)
    h, kvh, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    q, k, v = torch.randn(1, h, n, d), torch.randn(1, kvh, n, d), torch.randn(1, kvh, n, d)
    layers = []
    for i in range(shape["layers"]):
        m = torch.nn.Module()
        m.layer_idx = i
        layers.append(m)
    kernel = native_module()
    paths = {"plain": (False, None), "cascade": (True, None)} | ({"native": (True, kernel)} if kernel else {})
    out: dict[str, Any] = {}
    results = {}
    for name in [*paths, *paths]:  # twice each, alternating: drift hits every path alike
        cascade, native = paths[name]
        meta = AttentionMetadata.build(
            seqs, args.block_size, torch.device("cpu"), cascade, native is not None
        )
        FORWARD_CONTEXT.kv_cache, FORWARD_CONTEXT.meta, FORWARD_CONTEXT.native = cache, meta, native
        try:
            results[name] = paged_attention(layers[0], q, k, v, None, scaling=d**-0.5)[0].clone()
            start = time.perf_counter()
            for _ in range(args.repeats):
                for layer in layers:
                    paged_attention(layer, q, k, v, None, scaling=d**-0.5)
            ms = (time.perf_counter() - start) / args.repeats * 1000
        finally:
            FORWARD_CONTEXT.meta = FORWARD_CONTEXT.native = None
        out[f"{name}_ms"] = min(out.get(f"{name}_ms", ms), ms)
    out["max_abs_diff"] = max((results[p] - results["plain"]).abs().max().item() for p in paths)
    out["ratio"] = ratio(out["cascade_ms"], out["plain_ms"])
    if "native" in paths:
        out["native_ratio"] = ratio(out["native_ms"], out["plain_ms"])
    return out


def model_shape(model: str) -> dict[str, int]:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_dir(model), local_files_only=True).get_text_config()
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read the config of {model}: {exc}") from None
    heads = cfg.num_attention_heads
    return {
        "layers": cfg.num_hidden_layers,
        "heads": heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="apar-smol", help="whose attention shape (shipped name or HF dir)")
    p.add_argument("--branches", default="1,4,8,16", help="comma-separated sibling counts")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--own-tokens", type=int, default=32, help="each branch's own tokens so far")
    p.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per KV block (4, 8, 16 or 32)"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(RESULTS_DIR / "attention.json"), metavar="OUT")


def main(args: argparse.Namespace) -> int:

    from apar_worker.types import BLOCK_SIZES

    try:
        counts = [int(x) for x in args.branches.split(",")]
    except ValueError:
        raise BenchError("--branches takes comma-separated integers, e.g. 1,4,8,16") from None
    if min(counts + [args.prompt_tokens, args.own_tokens, args.repeats, args.threads]) < 1:
        raise BenchError(
            "--branches, --prompt-tokens, --own-tokens, --repeats and --threads must be positive"
        )
    if args.block_size not in BLOCK_SIZES:
        raise BenchError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}")
    shape = model_shape(args.model)
    rows = []
    with torch_threads(args.threads):
        for n in counts:
            rows.append({"branches": n, **measure(shape, n, args)})
    heads = ["branches", "plain ms", "cascade ms", "cascade / plain", "C++ ms", "C++ / plain", "max |diff|"]
    print(
        f"one decode step's attention over {shape['layers']} layers, {args.prompt_tokens}-token shared prompt"
    )
    print(
        table(
            heads,
            [
                [
                    *(r["branches"], r["plain_ms"], r["cascade_ms"], r["ratio"]),
                    *(r.get("native_ms"), r.get("native_ratio"), f"{r['max_abs_diff']:.1e}"),
                ]
                for r in rows
            ],
        )
    )
    if args.json:
        settings = {
            k: getattr(args, k) for k in ("model", "prompt_tokens", "own_tokens", "block_size", "threads")
        }
        data = {
            "benchmark": "attention",
            "machine": machine(),
            "settings": settings,
            "shape": shape,
            "rows": rows,
        }
        print(f"wrote {write_json(args.json, data)}")
    return 0
