"""`apar generate`: run one request through a local engine (or, with --server, a cluster).

On a terminal the branches are shown live, one line each, while they decode; the assembled
answer is printed at the end. `--json` prints one JSON object instead. Bad input exits
with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

from apar_worker.speculative import SpeculativeConfig
from apar_worker.types import LINEAR_KERNELS, AparError, GenerateRequest, SamplingParams


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="apar-smol", help="shipped model name or HF model directory")
    p.add_argument("--prompt", required=True, help="user message (rendered with the chat template)")
    p.add_argument("--raw-prompt", action="store_true", help="send --prompt as is, no chat template")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens over all branches")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-fork", action="store_true", help="decode sequentially ([Fork] is not acted on)")
    p.add_argument("--max-branches", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object with text and branches")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument(
        "--quantization",
        default="none",
        choices=["none", "int8"],
        help="int8: weight-only int8 linear layers",
    )
    p.add_argument(
        "--linear-kernel",
        default="auto",
        choices=LINEAR_KERNELS,
        help="auto: float32 CPU linears in the C++ kernel (int8 on AMX tiles, else with bfloat16 rows on "
        "AVX512_BF16), else oneDNN-packed; native: int8 with float32 rows; amx: float32 and int8 on AMX tiles "
        "(float32 as bf16 hi+lo, ~1e-5); bf16: int8 with bfloat16 rows; plain: torch's own path",
    )
    p.add_argument(
        "--speculative-config",
        default=None,
        metavar="JSON",
        help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'',
    )
    p.add_argument(
        "--server", default=None, metavar="HOST:PORT", help="call an `apar serve` cluster over gRPC"
    )
    p.add_argument("--session-id", default=None, help="conversation id for replica affinity (--server)")


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate an answer with APAR decoding")
    add_generate_arguments(p)
    p.set_defaults(func=run_local)


def build_request(args: argparse.Namespace, stream: bool) -> GenerateRequest:
    sampling = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    kw = (
        {"prompt": args.prompt}
        if args.raw_prompt
        else {"messages": [{"role": "user", "content": args.prompt}]}
    )
    spec = SpeculativeConfig.parse(args.speculative_config)  # --server: the method, per request
    return GenerateRequest(
        sampling=sampling,
        fork=not args.no_fork,
        max_branches=args.max_branches,
        stream=stream,
        speculative=spec.method if spec else None,
        **kw,
    )


class LiveView:
    """Redraws one line per branch on a terminal (cursor-up), cleared before the final answer."""

    def __init__(self, out=sys.stderr) -> None:
        self.out = out
        self.texts: dict[int, str] = {}
        self.parents: dict[int, int | None] = {}
        self.drawn = 0

    def update(self, branch_id: int, parent: int | None, delta: str) -> None:
        self.parents.setdefault(branch_id, parent)
        self.texts[branch_id] = self.texts.get(branch_id, "") + delta

    def draw(self) -> None:
        width = shutil.get_terminal_size((100, 20)).columns - 12
        lines = []
        for bid in sorted(self.texts):
            text = self.texts[bid].replace("\n", " ")
            tail = text if len(text) <= width else "…" + text[-width + 1 :]
            who = "root" if self.parents[bid] is None else f"b{bid}<b{self.parents[bid]}"
            lines.append(f"{who:>8} | {tail}")
        self.out.write(f"\x1b[{self.drawn}F" if self.drawn else "")
        for line in lines:
            self.out.write("\x1b[2K" + line + "\n")
        self.out.flush()
        self.drawn = len(lines)

    def clear(self) -> None:
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.out.flush()


def fail(message: str, code: int = 2) -> int:
    """The CLI's one way to fail: one line on stderr, exit code 2 (bad input) unless told."""
    print(f"apar: error: {message}", file=sys.stderr)
    return code


def run_local(args: argparse.Namespace) -> int:
    if args.server:
        return fail("--server needs the cluster client (cluster.client); run via the `apar` command")
    from apar_worker.engine import Engine, EngineConfig  # heavy import: only when used

    live = sys.stderr.isatty() and not args.json
    try:
        request = build_request(args, stream=live)
        request.validate()
        engine = Engine(
            EngineConfig(
                model=args.model,
                device=args.device,
                dtype=args.dtype,
                quantization=args.quantization,
                linear_kernel=args.linear_kernel,
                speculative=SpeculativeConfig.parse(args.speculative_config),
            )
        )
        start = time.monotonic()
        engine.add_request(request)
    except AparError as exc:
        return fail(str(exc))
    view = LiveView() if live else None
    output = None
    while output is None:
        for item in engine.step():
            if hasattr(item, "branches"):
                output = item
            elif view is not None:
                view.update(item.branch_id, item.parent_id, item.delta_text)
        if view is not None:
            view.draw()
    if view is not None:
        view.clear()
    if output.error:
        return fail(output.error)
    if args.json:
        data = output.to_json()
        data["latency_s"] = round(time.monotonic() - start, 6)
        print(json.dumps(data, ensure_ascii=False))
    else:
        print(output.text)
    return 0
