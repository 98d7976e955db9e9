"""`apar model list` and `apar model prepare NAME`: what models this machine can serve."""

from __future__ import annotations

import argparse
import json
import sys

from apar_worker.types import ModelLoadError


def _list(args: argparse.Namespace) -> int:
    from apar_worker.adapters import ADAPTER_CONFIG
    from apar_worker.base_models import list_models
    from apar_worker.model_registry import SHIPPED_MODELS_DIR, assembled_dir, shipped_models

    rows = []
    for name in shipped_models():
        d = SHIPPED_MODELS_DIR / name
        if (d / ADAPTER_CONFIG).is_file():
            base = json.loads((d / ADAPTER_CONFIG).read_text())["base"]
            ready = (assembled_dir(d) / "config.json").is_file()
            rows.append(
                {
                    "name": name,
                    "kind": f"shipped adapter on {base}",
                    "state": "assembled" if ready else "assembled on first use",
                    "path": str(d),
                }
            )
        else:
            rows.append({"name": name, "kind": "shipped", "state": "ready", "path": str(d)})
    rows += [{k: r[k] for k in ("name", "kind", "state", "path")} for r in list_models()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    kind_w = max(len(r["kind"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['kind']:<{kind_w}}  {r['state']:<24}  {r['path']}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from apar_worker.base_models import BASE_MODELS, prepare
    from apar_worker.model_registry import resolve_model, shipped_models

    try:
        if args.name in BASE_MODELS:
            path = prepare(args.name, force=args.force)
        elif args.name in shipped_models():
            path = resolve_model(args.name)  # assembles an adapter model (and its base) if needed
        else:
            known = ", ".join(sorted(BASE_MODELS) + shipped_models())
            raise ModelLoadError(f"unknown model {args.name!r} (known: {known})")
    except ModelLoadError as exc:
        print(f"apar: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    m = subparsers.add_parser("model", help="list and prepare models (offline, into $APAR_HOME)")
    sub = m.add_subparsers(dest="model_command", metavar="ACTION")
    sub.required = True
    ls = sub.add_parser("list", help="shipped, prepared and preparable models")
    ls.add_argument("--json", action="store_true", help="one JSON array")
    ls.set_defaults(func=_list)
    p = sub.add_parser("prepare", help="convert a packaged base model (or assemble a shipped adapter model)")
    p.add_argument("name", help="e.g. smollm2-135m-instruct or apar-smol")
    p.add_argument("--force", action="store_true", help="convert again even if already prepared")
    p.set_defaults(func=_prepare)
