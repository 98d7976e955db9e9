"""`apar bench speed` output: the tables it prints and the figure it draws."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import fmt, pyplot, ratio, table
from bench.speed import APAR, APAR_SPEC, LABELS, ORDER, TWIN, TWIN_SPEC, Prompt, Run


def print_tables(systems: dict[str, Any]) -> None:
    order = [s for s in ORDER if s in systems]
    rows = [
        [
            systems[s]["label"],
            systems[s]["median_steps"],
            systems[s]["median_tokens"],
            systems[s]["median_wall_s"],
            systems[s]["median_tok_s"],
            systems[s]["tok_s_ratio_vs_twin"],
            systems[s]["median_speedup_vs_twin"],
            "-" if s in (APAR, TWIN, APAR_SPEC, TWIN_SPEC) else _same(systems[s]),
        ]
        for s in order
    ]
    heads = [
        "system (batch 1, greedy)",
        "steps",
        "tokens",
        "wall s",
        "tok/s",
        "tok/s ratio",
        "speed-up",
        "same text (token prefix)",
    ]
    print(table(heads, rows))
    print("ratios are against the twin on our engine; speed-up = median over prompts of twin wall / wall")
    a = systems.get(APAR, {})
    for s in order[1:]:
        if f"median_speedup_vs_{s}" in a:
            print(
                f"APAR whole answer vs {systems[s]['label']}: {fmt(a[f'median_speedup_vs_{s}'])}x (median per prompt)"
            )
    _print_speculation(systems)
    a = systems.get(APAR, {})
    if "prompts_forked" in a:
        print(
            f"APAR forked on {a['prompts_forked']}/{a['prompts']} prompts; on those: speed-up "
            f"{fmt(a['median_speedup_forked'])}x, tok/s ratio {fmt(a['median_tok_s_ratio_forked'])}x"
        )
    kv = [s for s in (APAR, TWIN) if "median_peak_kv_blocks" in systems.get(s, {})]
    if len(kv) == 2:
        a, t = systems[APAR], systems[TWIN]
        rows = [
            [
                name,
                a[key],
                t[key],
                ratio(a[key], t[key]),
            ]
            for name, key in (
                ("peak KV blocks", "median_peak_kv_blocks"),
                ("attended tokens / step", "median_attended_per_step"),
                ("attended tokens / request", "median_attended_total"),
                ("branches / request", "median_branches"),
                ("fragmentation at peak (slots / stored tokens)", "median_fragmentation"),
                ("steps", "median_steps"),
            )
        ]
        print()
        print(table(["our engine (medians)", "APAR", "twin", "APAR/twin"], rows))


def _print_speculation(systems: dict[str, Any]) -> None:
    """Speculation's figures: speed-up with and without it, acceptance, what a step costs."""
    for s, plain in ((APAR_SPEC, APAR), (TWIN_SPEC, TWIN)):
        row = systems.get(s)
        if row is None:
            continue
        print(
            f"{row['label']}: {fmt(row['median_speedup_vs_twin'])}x the twin, "
            f"{fmt(row.get('median_speedup_vs_no_spec', float('nan')))}x {systems[plain]['label']}; "
            f"mean acceptance length {fmt(row.get('acceptance_length', 1.0))} tokens/branch-step; "
            f"step cost {fmt(row['median_step_cost_vs_twin'])}x the twin's "
            f"({fmt(systems[plain]['median_step_cost_vs_twin'])}x without speculation)"
        )


def _same(row: dict[str, Any]) -> str:
    text = f"{row['same_text_as_twin']:.0%}"
    return text + (f" ({row['median_same_token_prefix']:.0%})" if "median_same_token_prefix" in row else "")


def plot(runs: list[Run], prompts: list[Prompt], systems: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    by: dict[str, dict[str, Run]] = {}
    for r in runs:
        by.setdefault(r.system, {})[r.prompt_id] = r
    order = [s for s in ORDER if s in by]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(order))
    xs = range(len(prompts))
    for k, s in enumerate(order):
        ax1.bar(
            [x + k * width for x in xs],
            [by[s][p.id].tok_s if p.id in by[s] else 0 for p in prompts],
            width,
            label=LABELS[s],
        )
    ax1.set_xlabel("held-out prompt")
    ax1.set_ylabel("output tokens / s (batch 1)")
    ax1.legend(fontsize=7)
    ax1.set_title("Throughput per prompt, alone")
    if APAR in by and TWIN in by:
        sp = [ratio(by[TWIN][p.id].wall_s, by[APAR][p.id].wall_s) for p in prompts]
        ax2.bar(list(xs), sp, color="tab:green")
        ax2.axhline(1.0, color="grey", lw=1)
        ax2.axhline(systems[APAR]["median_speedup_vs_twin"], color="tab:red", ls="--", label="median")
        ax2.set_ylabel("speed-up (twin wall / APAR wall)")
        ax2.set_xlabel("held-out prompt")
        ax2.legend(fontsize=7)
        ax2.set_title("APAR vs sequential twin, our engine")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
