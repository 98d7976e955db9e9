"""`apar` command line: one entry point whose subcommands live next to the code they drive.

Each subcommand module exposes `register(subparsers)`; this hub only wires them up, so the
engine (`apar_worker`) never imports the cluster.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, description) of every subcommand group, imported lazily so `apar --help` stays fast.
_SUBCOMMAND_MODULES = [
    "apar_worker.cli_generate",  # apar generate (local; --server is handled by cluster.client)
    "apar_worker.cli_model",  # apar model list | apar model prepare
    "apar_train.cli",  # apar data build | apar train | apar eval
    "cluster.cli_serve",  # apar serve
    "cluster.cli_status",  # apar status
    "bench.cli",  # apar bench speed | apar bench load | apar bench autoscale
]


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on bad usage already; keep the message to one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"apar: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="apar", description="APAR Serve: parallel decoding for structured answers")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a module still being written must not break the others
            if exc.name and name.startswith(exc.name):
                continue
            raise
        module.register(sub)
    generate = sub.choices.get("generate")
    if generate is not None:
        generate.set_defaults(func=_generate)
    return parser


def _generate(args: argparse.Namespace) -> int:
    """Local engine by default; `--server HOST:PORT` goes through the gRPC client."""
    if args.server:
        from cluster.client import run_remote_generate

        return run_remote_generate(args)
    from apar_worker.cli_generate import run_local

    return run_local(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
