"""`apar bench load` output: the per-rate table, the saturation ratios, the figure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.common import pyplot, ratio, table
from bench.load import LABELS, TWIN


def print_tables(result: dict[str, Any]) -> None:
    heads = ["target", "rate", "ok/sent", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50",
             "e2e p50", "e2e p99", "tok/s vs twin"]  # fmt: skip
    twin = {r["rate"]: r for r in result["targets"].get(TWIN, [])}
    rows = []
    for name, rs in result["targets"].items():
        for r in rs:
            ref = twin.get(r["rate"])
            rows.append([
                LABELS.get(name, name), r["rate"], f"{r['requests'] - r['failed']}/{r['requests']}", r["req_s"],
                r["out_tok_s"], r["ttft_s"]["p50"], r["ttft_s"]["p99"], r["tpot_s"]["p50"], r["e2e_s"]["p50"],
                r["e2e_s"]["p99"], ratio(r["out_tok_s"], ref["out_tok_s"]) if ref else math.nan,
            ])  # fmt: skip
    print(table(heads, rows))
    sat = result["saturation"]
    for key, val in sat.items():
        if not isinstance(val, dict):
            print(f"saturation {key}: {val:.2f}x" if val == val else f"saturation {key}: -")


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for k, (name, rs) in enumerate(result["targets"].items()):
        rates, label, c = [r["rate"] for r in rs], LABELS.get(name, name), f"C{k}"
        axes[0].plot(rates, [r["out_tok_s"] for r in rs], "o-", color=c, label=label)
        axes[1].plot(rates, [r["ttft_s"]["p50"] for r in rs], "o-", color=c, label=label)
        axes[2].plot(rates, [r["e2e_s"]["p50"] for r in rs], "o-", color=c, label=f"{label} p50")
        axes[2].plot(rates, [r["e2e_s"]["p99"] for r in rs], "x--", color=c, label=f"{label} p99")
    for ax, title in zip(axes, ("output tokens/s", "TTFT p50 (s)", "end-to-end latency (s)"), strict=True):
        ax.set_xlabel("offered rate (req/s)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
