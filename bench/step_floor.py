"""The floors of `apar bench step` (bench/step.py): the least a step of T tokens can cost here.

A step reads its weights (and its rows' K/V) once, and performs ~2 x weights x T flops plus
attention. It cannot beat either the read at the measured memory bandwidth or the arithmetic
at the measured vector peak (peak.cpp: FMA chains in registers on every thread). On a GPU, and
on CPUs whose FMA units outrun their memory, the read is the longer one up to tens of tokens and
a 16-token step costs a 1-token step; on 2 Zen 4 cores (one 512-bit FMA a cycle each, ~30 GB/s)
16 tokens of SmolLM2 take longer to compute than to read. The per-T floor makes that visible:
a 16-token target ratio below the floor's own ratio cannot be met on this machine.
"""

from __future__ import annotations

import time
from typing import Any


def bandwidth_gbs(mb: int) -> float:
    """Memory bandwidth (GB/s, read + write) of the best of 5 copies of an `mb`-MiB tensor."""
    import torch

    src = torch.ones(mb * 2**18)  # fp32: 4 bytes each
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def weight_bytes(model) -> int:
    """Bytes a 1-token step reads: every parameter and buffer once, but not the input embedding
    table (a step reads only its rows) unless the output projection is that same table, nor
    int8 layers' bf16 copies (read by steps of many rows instead of the int8 weights)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_weight = getattr(head, "weight", None)
    buffers = [b for name, b in model.named_buffers() if not name.endswith("weight_bf16")]
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *buffers]:
        if t is embed and head_weight is not embed:
            continue
        seen[t.data_ptr()] = t.numel() * t.element_size()
    packed = sum(getattr(m, "packed_bytes", 0) for m in model.modules())  # oneDNN layers' weights
    if head_weight is not None and getattr(head, "packed_bytes", 0):
        packed -= head.packed_bytes  # the head reads its packed copy, counted already as `weight`
    return sum(seen.values()) + packed


def _dims(config) -> dict[str, int] | None:
    """A Llama-style decoder's sizes (q/k/v/o, gate/up/down, the head), or None."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        heads = c.num_attention_heads
        dims = {
            "hidden": c.hidden_size,
            "inter": c.intermediate_size,
            "layers": c.num_hidden_layers,
            "heads": heads,
            "kv_heads": getattr(c, "num_key_value_heads", None) or heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads,
            "vocab": c.vocab_size,
        }
    except AttributeError:
        return None
    return dims if all(isinstance(v, int) and v > 0 for v in dims.values()) else None


def step_cost_model(config, context: int, kv_bytes: int) -> dict[str, float] | None:
    """Per decode token: flops (every linear once, attention over `context` keys) and the K/V
    bytes of one context token (all layers), for the floors below; None for other layouts."""
    d = _dims(config)
    if d is None:
        return None
    q, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    per_layer = d["hidden"] * (q + 2 * kv) + q * d["hidden"] + 3 * d["hidden"] * d["inter"]
    linear = 2.0 * (d["layers"] * per_layer + d["vocab"] * d["hidden"])
    attention = 4.0 * d["layers"] * q * context
    return {"flops": linear + attention, "kv_token_bytes": float(d["layers"] * 2 * kv * kv_bytes)}


def row_floor(
    cost: dict[str, float] | None,
    wbytes: int,
    tokens: int,
    requests: int,
    context: int,
    gbs: float,
    gflops: float,
) -> dict[str, Any]:
    """The floor of one step: its reads (weights, and each request's context K/V once: sibling
    branches share it) at `gbs`, or its flops at `gflops`, whichever takes longer."""
    read = wbytes + (requests * context * cost["kv_token_bytes"] if cost else 0)
    memory_ms = read / (gbs * 1e9) * 1000
    compute_ms = tokens * cost["flops"] / (gflops * 1e9) * 1000 if cost and gflops > 0 else 0.0
    return {
        "floor_ms": max(memory_ms, compute_ms),
        "memory_ms": memory_ms,
        "compute_ms": compute_ms,
        "bound": "compute" if compute_ms > memory_ms else "memory",
    }


def peak_gflops(native: Any | None, bf16: bool) -> float:
    """The vector peak of every torch thread (bf16: VDPBF16PS), or 0 without the kernels."""
    if native is None or not hasattr(native, "fma_peak_gflops"):
        return 0.0
    return float(native.fma_peak_gflops(bf16))
