"""`apar data build`, `apar train`, `apar eval`: the training recipe's command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from apar_worker.cli_generate import fail as _fail

CONFIGS = Path(__file__).parent / "configs"


def config_path(name: str) -> Path | None:
    """A YAML file, or the name of a shipped config (`apar-smol` -> apar_train/configs/apar-smol.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIGS / f"{name.removesuffix('.yaml')}.yaml"
    return shipped if shipped.is_file() else None


def _data_build(args: argparse.Namespace) -> int:
    from apar_train.data import DataConfig, build

    cfg = DataConfig(seed=args.seed, paragraphs=args.paragraphs, cue_filter=not args.no_cue_filter)
    if args.max_answer_chars is not None:
        cfg.max_answer_chars = args.max_answer_chars
    try:
        stats = build(Path(args.out), cfg)
    except (OSError, RuntimeError, ValueError) as exc:
        return _fail(str(exc))
    print(json.dumps(stats, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from apar_train.config import load_config
    from apar_train.train import train

    path = config_path(args.config)
    if path is None:
        shipped = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
        return _fail(f"config {args.config!r} is neither a file nor a shipped config ({shipped})")
    try:
        cfg = load_config(path)
    except ValueError as exc:
        return _fail(str(exc))
    if args.export_step is not None:
        from apar_train.train import export_snapshot

        try:
            out = export_snapshot(cfg, args.export_step)
        except ValueError as exc:
            return _fail(str(exc))
        print(json.dumps({"model_dir": str(out), "steps": args.export_step}))
        return 0
    if args.draft_heads:
        return _train_heads(cfg, args)
    if args.steps is not None:
        cfg.train.steps = args.steps
    info = train(cfg, progress=not args.quiet)
    print(json.dumps({"model_dir": cfg.out_dir, **info}))
    return 0


def _train_heads(cfg, args: argparse.Namespace) -> int:
    """Draft heads for the model this config trained, written next to it."""
    from apar_train.draft_heads import HeadsConfig, train_heads
    from apar_worker.model_registry import shipped_models
    from apar_worker.types import AparError

    model = cfg.name if cfg.name in shipped_models() else cfg.out_dir
    heads = HeadsConfig(
        model=model,
        num_prompts=args.heads_prompts,
        epochs=args.heads_epochs,
        seed=args.heads_seed,
        cache=Path(args.heads_cache) if args.heads_cache else None,
    )
    try:
        info = train_heads(heads, Path(cfg.out_dir), progress=not args.quiet)
    except (AparError, OSError) as exc:
        return _fail(str(exc))
    print(json.dumps(info))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from apar_train.eval import run_eval_cli

    return run_eval_cli(args)


def _add_heads_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument(
        "--draft-heads",
        action="store_true",
        help="instead: fit speculative draft heads on the trained model's own answers (shipped beside it)",
    )
    t.add_argument("--heads-prompts", type=int, default=320, help="training prompts answered for the heads")
    t.add_argument("--heads-epochs", type=int, default=4, help="epochs over the recorded states")
    t.add_argument("--heads-seed", type=int, default=0, help="order of the prompts, the split, the init")
    t.add_argument(
        "--heads-cache",
        default=None,
        metavar="FILE",
        help="save the recorded states here; reuse them if it exists",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="training data (ShareGPT -> fork format)")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True
    b = data_sub.add_parser("build", help="rewrite ShareGPT into the fork format, split, train the tokenizer")
    b.add_argument("--out", default="data/sharegpt-apar", help="output directory (default: %(default)s)")
    b.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default: 0)")
    b.add_argument("--paragraphs", action="store_true", help="also fork 3+ paragraph prose answers")
    b.add_argument("--no-cue-filter", action="store_true", help="keep turns whose prompt cue disagrees")
    b.add_argument("--max-answer-chars", type=int, default=None, help="longest answer kept (default 2400)")
    b.set_defaults(func=_data_build)

    t = subparsers.add_parser("train", help="train an APAR model or its sequential twin from a YAML config")
    t.add_argument(
        "--config",
        required=True,
        help="YAML file, or a shipped config's name (apar-smol, apar-tiny, apar-tiny-seq)",
    )
    t.add_argument("--steps", type=int, default=None, help="override the config's step count")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--export-step", type=int, default=None, help="only export the snapshot of this step")
    _add_heads_arguments(t)
    t.set_defaults(func=_train)

    e = subparsers.add_parser("eval", help="fork rate, step ratio and held-out loss vs a sequential twin")
    e.add_argument("--model", default="apar-smol", help="APAR model name or directory")
    e.add_argument(
        "--baseline", default=None, help="sequential baseline (default: the model's base, or its -seq twin)"
    )
    e.add_argument(
        "--prompts", default=None, help="JSON lines {id, kind, prompt} (default: shipped held-out)"
    )
    e.add_argument(
        "--heldout", default=None, help="held-out answers (JSON lines from `apar data build`) for loss"
    )
    e.add_argument("--limit", type=int, default=None, help="at most this many prompts per kind")
    e.add_argument("--max-tokens", type=int, default=640, help="generation budget per request")
    e.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="greedy with this penalty, both models"
    )
    e.add_argument("--batch", type=int, default=1, help="requests decoded together (default: %(default)s)")
    e.add_argument("--json", default=None, help="also write the report here")
    e.add_argument("--side-by-side", default=None, help="write a markdown file of answers side by side")
    e.add_argument("--update-cards", action="store_true", help="write the figures into both model cards")
    e.set_defaults(func=_eval)
