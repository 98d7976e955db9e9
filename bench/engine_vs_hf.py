"""Engine throughput vs `transformers` generate on the same tiny random model, same run.

    python -m bench.engine_vs_hf [--quick] [--json OUT]

Two workloads: batch 1 (one request alone), and 32 requests with mixed prompt and output
lengths arriving over time, where `generate` gets them as padded static batches in arrival
order (a batch starts when its last request has arrived and the previous batch is done).
Figures are output tokens/s; ratios are engine / generate.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from apar_worker.engine import Engine, EngineConfig
from apar_worker.types import GenerateRequest, SamplingParams

VOCAB = 8192


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """~5M parameters: the scale of the shipped model."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def plain_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")), eos_token="t0", pad_token="t0"
    )


def workload(n: int, seed: int = 0) -> list[tuple[float, list[int], int]]:
    """(arrival time s, prompt ids, output tokens) with mixed lengths, Poisson arrivals."""
    g = torch.Generator().manual_seed(seed)
    t = 0.0
    items = []
    for _ in range(n):
        t += float(torch.empty(1).exponential_(1 / 0.05, generator=g))
        plen = int(torch.randint(8, 200, (1,), generator=g))
        olen = int(torch.randint(16, 160, (1,), generator=g))
        items.append((t, torch.randint(1, VOCAB, (plen,), generator=g).tolist(), olen))
    return items


def run_engine(engine: Engine, items) -> tuple[float, int]:
    start = time.perf_counter()
    pending = list(items)
    done = 0
    tokens = 0
    while done < len(items):
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            _, prompt, olen = pending.pop(0)
            engine.add_request(
                GenerateRequest(
                    prompt_token_ids=prompt,
                    fork=False,
                    sampling=SamplingParams(max_tokens=olen, ignore_eos=True),
                )
            )
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        for item in engine.step():
            if hasattr(item, "branches"):
                done += 1
                tokens += item.num_tokens
    return time.perf_counter() - start, tokens


@torch.no_grad()
def run_hf(model, items, batch_size: int) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        wait = batch[-1][0] - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)
        width = max(len(p) for _, p, _ in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (_, p, _) in enumerate(batch):  # left padding
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        max_new = max(o for _, _, o in batch)
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=0,
        )
        tokens += sum(o for _, _, o in batch)  # useful tokens only; padding rows are waste
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens (smoke run)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = one compute core)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = tiny_llama()
    ref = tiny_llama()
    ref.set_attn_implementation("sdpa")
    engine = Engine.from_model(
        model, plain_tokenizer(), EngineConfig(block_size=16, num_blocks=2048, max_num_batched_tokens=1024)
    )
    new = 32 if args.quick else 128
    prompt = list(range(1, 33))
    results = {}
    # batch 1 (warm-up first)
    run_engine(engine, [(0.0, prompt, 8)])
    run_hf(ref, [(0.0, prompt, 8)], 1)
    e_t, e_n = run_engine(engine, [(0.0, prompt, new)])
    h_t, h_n = run_hf(ref, [(0.0, prompt, new)], 1)
    results["batch1"] = {"engine_tok_s": e_n / e_t, "hf_tok_s": h_n / h_t, "ratio": (e_n / e_t) / (h_n / h_t)}
    items = workload(8 if args.quick else args.requests)
    e_t, e_n = run_engine(engine, items)
    h_t, h_n = run_hf(ref, items, args.hf_batch)
    results["mixed"] = {
        "requests": len(items),
        "engine_tok_s": e_n / e_t,
        "hf_tok_s": h_n / h_t,
        "ratio": (e_n / e_t) / (h_n / h_t),
        "engine_s": e_t,
        "hf_s": h_t,
    }
    print(f"{'workload':<10} {'engine tok/s':>12} {'generate tok/s':>15} {'ratio':>7}")
    for name, r in results.items():
        print(f"{name:<10} {r['engine_tok_s']:>12.0f} {r['hf_tok_s']:>15.0f} {r['ratio']:>6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
