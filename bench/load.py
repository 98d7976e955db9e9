"""`apar bench load`: bounded Poisson load on loopback at several rates, APAR vs the twin vs vLLM.

Each target gets the same arrivals (same seed) with a mix of structured and unstructured held-out
prompts: APAR on our cluster (gRPC GenerateStream, fork on, and the same cluster through its
OpenAI HTTP endpoint), the sequential twin on our cluster (fork off), and vLLM-CPU serving the
twin (OpenAI HTTP API, streamed). Per rate: TTFT, time per
output token, end-to-end p50/p99, requests/s and output tokens/s. Every run is bounded in request
count, per-request timeout and time, and targets 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    BenchError,
    Prompt,
    check_loopback,
    machine,
    mixed_prompts,
    model_pair,
    poisson_arrivals,
    ratio,
    summarize,
    write_json,
)
from bench.serve_local import LocalServe
from bench.targets import CompletionsTarget, EngineTarget, GrpcTarget, HttpTarget, Result

APAR, TWIN, VLLM, ENGINE = "apar", "twin", "twin-vllm", "twin-engine"
APAR_HTTP, TWIN_HTTP = "apar-http", "twin-http"
APAR_SPEC = "apar-spec"  # with --speculative: the APAR cluster again, requests drafting
LLAMA = "twin-llamacpp"
LABELS = {
    APAR: "APAR, our cluster (gRPC)",
    TWIN: "twin, our cluster (gRPC)",
    APAR_HTTP: "APAR, our cluster (OpenAI HTTP)",
    APAR_SPEC: "APAR + speculative, our cluster (gRPC)",
    TWIN_HTTP: "twin, our cluster (OpenAI HTTP)",
    VLLM: "twin, vLLM-CPU",
    ENGINE: "twin, our engine in-process",
    LLAMA: "twin, llama.cpp Q4_1 (llama-server --parallel 16)",
}


def run_rate(
    target,
    prompts: list[Prompt],
    rate: float,
    duration_s: float,
    max_requests: int,
    max_tokens: int,
    bar=None,
) -> tuple[list[Result], float]:
    """Open-loop Poisson arrivals; returns the results and the wall time until the last one ended."""
    arrivals = poisson_arrivals(rate, duration_s, max_requests, seed=int(rate * 1000))
    results: list[Result] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        r = target(prompts[i % len(prompts)], max_tokens)
        with lock:
            results.append(r)
        if bar is not None:
            bar.update(1)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, len(arrivals))) as pool:
        for i, at in enumerate(arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, i)
    return results, time.perf_counter() - t0


def summarize_rate(results: list[Result], window_s: float, rate: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    out: dict[str, Any] = {
        "rate": rate,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "window_s": window_s,
        "req_s": len(ok) / window_s if window_s > 0 else math.nan,
        "out_tok_s": tokens / window_s if window_s > 0 else math.nan,
        "ttft_s": summarize([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": summarize([t for r in ok if (t := r.tpot_s) is not None]),
        "e2e_s": summarize([r.e2e_s for r in ok]),
        "mean_tokens": tokens / len(ok) if ok else math.nan,
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }
    return out


def run_target(name: str, target, prompts, args) -> list[dict[str, Any]]:
    from tqdm import tqdm

    total = sum(len(poisson_arrivals(r, args.duration, args.max_requests, int(r * 1000))) for r in args.rates)
    rows = []
    with tqdm(total=total, desc=f"load {name}", unit="req") as bar:
        for rate in args.rates:
            results, window = run_rate(
                target, prompts, rate, args.duration, args.max_requests, args.max_tokens, bar
            )
            rows.append(summarize_rate(results, window, rate))
    return rows


def run_cluster(
    names: tuple[str, str], grpc_addr: str, http_addr: str | None, fork: bool, prompts, args
) -> dict[str, list[dict[str, Any]]]:
    """The same cluster through gRPC, then through its OpenAI HTTP endpoint (a name "" skips one)."""
    out: dict[str, list[dict[str, Any]]] = {}
    grpc_name, http_name = names
    # with --speculative the deployment drafts; plain targets' requests say "off"
    spec = getattr(args, "speculative", None)
    runs = [(grpc_name, "off" if spec else "")]
    if spec and grpc_name == APAR:
        runs.append((APAR_SPEC, ""))
    for name, choice in runs:
        if not name:
            continue
        target = GrpcTarget(
            grpc_addr, fork=fork, timeout_s=args.timeout, unary=args.unary, speculative=choice
        )
        try:
            target(prompts[0], 8)  # warm-up
            out[name] = run_target(name, target, prompts, args)
        finally:
            target.close()
    if http_name and http_addr:
        http = HttpTarget(http_addr, fork=fork, timeout_s=args.timeout)
        http(prompts[0], 8)
        out[http_name] = run_target(http_name, http, prompts, args)
    return out


def _quantization(args) -> str | None:
    """Our engine's weights, as EngineConfig takes them (None: plain)."""
    q = getattr(args, "quantization", "none")
    return None if q == "none" else q


def serve_config(model: str, args) -> dict[str, Any]:
    """One worker replica on one core: the same footprint as the one vLLM engine process."""
    return {
        "model": model,
        "engine": {
            "device": "cpu",
            "kv_cache_memory_mb": 128,
            "max_num_seqs": 128,
            "speculative": getattr(args, "speculative", None),
            "quantization": _quantization(args),
        },
        "limits": {"max_tokens": 2048},
        "worker": {
            "num_replicas": 1,
            "num_cpus": getattr(args, "worker_cpus", 1.0),  # Ray gives the replica as many threads
            "max_ongoing_requests": args.max_requests + 8,
        },
        "ingress": {"num_cpus": 0.1},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if isinstance(getattr(args, "speculative", None), str):  # the bare flag's const skips `type`
        args.speculative = _spec(args.speculative)
    prompts = mixed_prompts(args.prompts, 64, seed=0)
    targets: dict[str, list[dict[str, Any]]] = {}
    notes: list[str] = []
    log_dir = RESULTS_DIR / "tmp"
    if args.server:
        names = (TWIN, TWIN_HTTP) if args.no_fork else (APAR, APAR_HTTP)
        targets.update(run_cluster(names, args.server, args.http, not args.no_fork, prompts, args))
        return _result(args, targets, notes)
    apar_dir, twin_dir = model_pair(args)
    wanted = set(args.targets) - ({VLLM} if args.no_vllm else set())
    for names, model, fork in (((APAR, APAR_HTTP), apar_dir, True), ((TWIN, TWIN_HTTP), twin_dir, False)):
        names = tuple(n if n in wanted else "" for n in names)
        if not any(names):
            continue
        print(f"starting apar serve with {model.name} ...", flush=True)
        log = log_dir / f"serve-{names[0] or names[1]}.log"
        with LocalServe(serve_config(str(model), args), log, args.num_cpus) as srv:
            targets.update(run_cluster(names, srv.address, srv.http_address, fork, prompts, args))
    if ENGINE in wanted:
        print("twin on our engine in this process (no Ray Serve, no gRPC) ...", flush=True)
        threads = max(1, round(getattr(args, "worker_cpus", 1)))  # the replica's threads and weights
        target = EngineTarget(str(twin_dir), False, args.timeout, threads, _quantization(args))
        try:
            target(prompts[0], 8)
            targets[ENGINE] = run_target(ENGINE, target, prompts, args)
        finally:
            target.close()
    if VLLM in wanted:
        from bench import vllm_peer

        reason = vllm_peer.skip_reason()
        if reason:
            print(reason, flush=True)
            notes.append(reason)
        else:
            from transformers import AutoTokenizer

            from bench.vllm_compat import vllm_model_dir
            from cluster.redis_server import free_port

            tok = AutoTokenizer.from_pretrained(twin_dir)
            vllm_dir, note = vllm_model_dir(twin_dir, log_dir)
            if note:
                notes.append(note)
                print(note, flush=True)
            print("starting vLLM-CPU server on the twin ...", flush=True)
            try:
                with vllm_peer.VllmServer(
                    vllm_dir, free_port(), log_dir / "vllm-load.log", max_model_len=args.max_model_len,
                    threads=max(1, round(args.worker_cpus)), max_num_seqs=128,
                ) as srv:  # fmt: skip
                    target = CompletionsTarget(srv.port, tok, args.timeout)
                    target(prompts[0], 8)
                    targets[VLLM] = run_target(VLLM, target, prompts, args)
            except BenchError as exc:
                notes.append(f"vLLM skipped: {exc}")
                print(notes[-1], flush=True)
    if LLAMA in wanted:
        rows, note = run_llamacpp(args.baseline, twin_dir, prompts, args, log_dir)
        if rows:
            targets[LLAMA] = rows
        if note:
            notes.append(note)
            print(note, flush=True)
    return _result(args, targets, notes)


def run_llamacpp(base: str, twin_dir: Path, prompts, args, log_dir: Path):
    """llama-server on the base's Q4_1 GGUF with 16 slots (continuous batching), same token ids."""
    from apar_worker.base_models import BASE_MODELS
    from bench import llamacpp_peer as lc
    from cluster.redis_server import free_port

    reason = lc.skip_reason() or (
        None if base in BASE_MODELS else f"llama.cpp needs a GGUF base; {base} is not one"
    )
    if reason:
        return None, reason
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(twin_dir)
    print("starting llama-server (Q4_1, 16 slots) ...", flush=True)
    try:
        with lc.LlamaServer(lc.gguf_file(base, lc.Q4), free_port(), log_dir / "llamacpp-load.log",
                            ctx_per_slot=args.max_model_len, threads=args.llamacpp_threads, parallel=16) as srv:  # fmt: skip
            target = CompletionsTarget(srv.port, tok, args.timeout)  # the same OpenAI /v1/completions client
            target(prompts[0], 32)  # warm-up: the first request pages the weights in
            return run_target(LLAMA, target, prompts, args), None
    except BenchError as exc:
        return None, f"llama.cpp skipped: {exc}"


def _result(args, targets, notes) -> dict[str, Any]:
    return {
        "benchmark": "load",
        "machine": machine(),
        "settings": {
            "server": args.server or "local",
            "model": args.model,
            "baseline": args.baseline,
            "rates": args.rates,
            "duration_s": args.duration,
            "max_requests_per_rate": args.max_requests,
            "max_tokens": args.max_tokens,
            "prompt_mix": "held-out structured/unstructured, alternating",
            "stream": not args.unary,
            "quantization": getattr(args, "quantization", "none"),
            "worker_cpus": getattr(args, "worker_cpus", 1.0),
        },
        "notes": notes,
        "targets": targets,
        "saturation": saturation(targets),
    }


def saturation(targets: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Best achieved throughput per target and the ratios of ours to each peer."""
    best = {n: max(rows, key=lambda r: r["out_tok_s"] or 0) for n, rows in targets.items() if rows}
    out: dict[str, Any] = {
        n: {"out_tok_s": r["out_tok_s"], "req_s": r["req_s"], "rate": r["rate"]} for n, r in best.items()
    }
    if APAR in best:
        for peer in (TWIN, VLLM, APAR_HTTP, LLAMA):
            if peer in best:
                out[f"apar_vs_{peer}_tok_s"] = ratio(best[APAR]["out_tok_s"], best[peer]["out_tok_s"])
                out[f"apar_vs_{peer}_req_s"] = ratio(best[APAR]["req_s"], best[peer]["req_s"])
    if APAR in best and APAR_SPEC in best:  # issue 15: drafting must not cost throughput under load
        out["apar_spec_vs_apar_tok_s"] = ratio(best[APAR_SPEC]["out_tok_s"], best[APAR]["out_tok_s"])
    if TWIN in best and VLLM in best:
        out["twin_ours_vs_vllm_tok_s"] = ratio(best[TWIN]["out_tok_s"], best[VLLM]["out_tok_s"])
    return out


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rate wants numbers like 1,2,4, got {text!r}") from None
    if not rates or any(r <= 0 or r > 100 for r in rates):
        raise argparse.ArgumentTypeError("--rate values must be in (0, 100] req/s")
    return rates


def _spec(text: str) -> dict:
    from apar_worker.speculative import SpeculativeConfig
    from apar_worker.types import InvalidRequestError

    try:
        spec = SpeculativeConfig.parse(text)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if spec is None:
        raise argparse.ArgumentTypeError('--speculative wants a config such as \'{"method": "ngram"}\'')
    return spec.to_dict()


def _targets(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in LABELS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"--targets: unknown {bad or text!r}; choose from {','.join(LABELS)}"
        )
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", default=None, metavar="HOST:PORT", help="a running apar serve (loopback)")
    where.add_argument("--local", action="store_true", help="start apar serve ourselves (the default)")
    p.add_argument("--rate", dest="rates", type=_rates, default=[1.0, 2.0, 4.0, 8.0], metavar="R[,R...]",
                   help="offered request rates, req/s (default 1,2,4,8)")  # fmt: skip
    p.add_argument("--duration", type=float, default=10.0, metavar="S", help="arrivals per rate (s)")
    p.add_argument("--max-requests", type=int, default=32, metavar="N", help="cap per rate")
    p.add_argument("--max-tokens", type=int, default=160, metavar="N")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S", help="per-request timeout")
    p.add_argument("--model", default="apar-smol")
    p.add_argument("--baseline", default=None, help="default: the model's base, or its -seq twin")
    p.add_argument("--http", default=None, metavar="HOST:PORT",
                   help="with --server: also drive its OpenAI HTTP endpoint (loopback)")  # fmt: skip
    p.add_argument("--no-fork", action="store_true", help="with --server: send fork=false")
    p.add_argument(
        "--unary",
        action="store_true",
        help="our cluster via unary Generate (TTFT from the replica), not streamed",
    )
    p.add_argument("--speculative", nargs="?", const='{"method": "ngram"}', default=None, metavar="JSON",
                   type=_spec, help="APAR also with speculative decoding, same cluster (default ngram)")  # fmt: skip
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM-CPU peer")
    p.add_argument(
        "--targets",
        type=_targets,
        default=[APAR, APAR_HTTP, TWIN, VLLM, LLAMA],
        metavar="T[,T...]",
        help=f"with --local, of {','.join(LABELS)} (default apar,apar-http,twin,twin-vllm,twin-llamacpp; the -http "
        "targets drive the same cluster through /v1/chat/completions; twin-engine is our engine "
        "in-process, the cluster's cost left out)",
    )
    p.add_argument(
        "--max-model-len", type=int, default=1024, help="vLLM / llama.cpp (per slot) context length"
    )
    p.add_argument("--llamacpp-threads", type=int, default=2, help="llama-server threads (default 2)")
    p.add_argument("--num-cpus", type=float, default=2.0, help="CPUs Ray may use for apar serve")
    p.add_argument("--worker-cpus", type=float, default=1.0,
                   help="CPUs (torch threads) of the one worker replica, and vLLM-CPU's threads; llama-server's are --llamacpp-threads")  # fmt: skip
    p.add_argument("--quantization", choices=["none", "int8"], default="none",
                   help="our clusters' weights: int8 weight-only, as `apar serve --quantization`")  # fmt: skip
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl")
    p.add_argument("--json", default=str(RESULTS_DIR / "load.json"), metavar="OUT")
    p.add_argument("--plot", default=str(RESULTS_DIR / "load.png"), metavar="OUT.png")


def main(args: argparse.Namespace) -> int:
    from bench.load_report import plot, print_tables

    if args.duration <= 0 or args.duration > 600 or not 1 <= args.max_requests <= 512:
        raise BenchError("--duration must be in (0, 600] and --max-requests in [1, 512]")
    if args.max_tokens < 1 or args.timeout <= 0:
        raise BenchError("--max-tokens and --timeout must be positive")
    if args.server:
        check_loopback(args.server)
    if args.http:
        if not args.server:
            raise BenchError("--http goes with --server (with --local the -http targets are in --targets)")
        check_loopback(args.http)
    result = run(args)
    print()
    print_tables(result)
    for note in result["notes"]:
        print(f"note: {note}")
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    if args.plot:
        plot(result, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0
