"""The printed report and the plot of `apar bench step` (bench/step.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import fmt, pyplot, table

BRANCHES = (1, 8)  # branches per request of the step rows


def _weights_name(mode: dict) -> str:
    weights = "fp32" if mode["quantization"] == "none" else mode["quantization"]
    names = {
        "onednn": "oneDNN-packed linears",
        "native": "C++ linears",
        "amx": "C++ linears on AMX tiles",
        "bf16": "C++ linears, bf16 rows",
    }
    parts = [names[mode["linear_kernel"]]] if mode.get("linear_kernel") in names else []
    parts += ["C++ attention"] if mode.get("attention") == "native" else []
    return f"{weights} ({', '.join(parts) or 'plain torch ops'})"


def print_report(result: dict[str, Any]) -> None:
    s = result["settings"]
    print(
        f"apar bench step: {s['model']}, {s['threads']} threads, context {s['context']}, "
        f"median of {s['repeats']} steps; memory bandwidth {result['bandwidth_gbs']:.1f} GB/s"
    )
    hf = {r["tokens"]: r["ms"] for r in result["transformers"]}
    for mode in result["modes"]:
        by_row = {(r["branches"], r["tokens"]): r for r in mode["rows"]}
        by = {key: r["ms"] for key, r in by_row.items()}
        over = mode["ratios"]["over_1_token"]
        rows = []
        for t in s["tokens"]:
            cells: list[Any] = [t]
            for b in BRANCHES:
                cells += [by.get((b, t)), over.get(str(b), {}).get(str(t))]
            rows.append([*cells, by_row[(8, t)]["floor_ms"] if (8, t) in by_row else None, hf.get(t)])
        heads = ["T", "1 br/req ms", "x 1-tok", "8 br/req ms", "x 1-tok", "floor 8 br/req", "transformers ms"]
        print(
            f"\n{_weights_name(mode)} weights: {mode['weight_bytes'] / 1e6:.1f} MB, "
            f"bandwidth floor {mode['floor_ms']:.1f} ms; vector peak {mode['peak_gflops']:.0f} GFLOP/s"
        )
        print(table(heads, rows))
        least = mode["ratios"]["floor_over_1_token_floor"]
        for b in BRANCHES:
            for t in (16, max(s["tokens"])):
                if str(t) in over.get(str(b), {}):
                    row = by_row[(b, t)]
                    print(
                        f"{t}-token step / 1-token step ({b} br/req): {over[str(b)][str(t)]:.2f} "
                        f"(floors allow {least[str(b)][str(t)]:.2f}: {row['floor_ms']:.1f} ms, {row['bound']}-bound)"
                    )
                    break
        print(f"1-token step / bandwidth floor: {fmt(mode['ratios']['one_token_over_floor'])}")
        for b in BRANCHES:  # the per-step Python budget: 5 % of a step at 64 running branches
            top = max(
                (r for r in mode["rows"] if r["branches"] == b), key=lambda r: r["tokens"], default=None
            )
            if top is not None:
                print(
                    f"host work (scheduling, metadata, sampling, rules) at {top['tokens']} tokens, {b} br/req: "
                    f"{top['host_ms']:.2f} ms, {100 * top['host_ms'] / top['ms']:.1f} % of the step"
                )


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        plt = pyplot()
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, ls in zip(result["modes"], ("-", "-."), strict=False):
        name = _weights_name(mode)
        for b in BRANCHES:
            rows = [r for r in mode["rows"] if r["branches"] == b]
            if rows:
                xs, ys = [r["tokens"] for r in rows], [r["ms"] for r in rows]
                ax.plot(xs, ys, "o" + ls, label=f"engine {name}, {b} br/req")
        ax.axhline(mode["floor_ms"], ls=":", color="gray" if ls == "-" else "black", label=f"floor {name}")
    if result["transformers"]:
        hf = result["transformers"]
        ax.plot([r["tokens"] for r in hf], [r["ms"] for r in hf], "s--", label="transformers forward")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens in the step (T)")
    ax.set_ylabel("ms per step")
    ax.set_title(f"step cost, {result['settings']['model']}, {result['settings']['threads']} threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
