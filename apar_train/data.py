"""`apar data build`: ShareGPT turns -> fork-format trees, seeded held-out split, tokenizer, stats.

Kinds: "structured" (rewritten into a tree) and "unstructured" (kept as is). Turns whose
answer has a numbered list that does not qualify are dropped, and (by default) so are turns
whose prompt and answer disagree with a list cue in the prompt: a tiny model can then learn
*when* to answer with a list, which is the decision the fork-rate figures measure.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from apar_train.rewrite import (
    Tree,
    assemble,
    has_numbered_list,
    rewrite_list,
    rewrite_paragraphs,
)
from apar_train.sharegpt import dataset_file, is_english, iter_records

LIST_CUE = re.compile(
    r"\b(tips|ways|list|steps|ideas|examples|reasons|benefits|strategies|suggest\w*|top \d+|"
    r"what are|how (?:can|do|to|should)|advantages|features|factors|recommend\w*|best practices|"
    r"challenges|things)\b",
    re.IGNORECASE,
)


@dataclass
class DataConfig:
    """Selection knobs of the data build (defaults are what the shipped models used)."""

    seed: int = 0
    heldout_percent: float = 5.0
    max_prompt_chars: int = 400
    max_answer_chars: int = 2400
    paragraphs: bool = False  # also fork 3+ paragraph prose after each first sentence
    cue_filter: bool = True  # keep structured turns with a list cue, unstructured without one
    vocab_size: int = 8192


@dataclass
class Item:
    id: str
    conv: str
    kind: str  # "structured" | "unstructured"
    prompt: str
    answer: str
    tree: dict | None  # Tree as {"segments", "children"}; None for unstructured


def tree_to_dict(t: Tree) -> dict:
    return {"segments": t.segments, "children": [tree_to_dict(c) for c in t.children]}


def tree_from_dict(d: dict) -> Tree:
    return Tree(list(d["segments"]), [tree_from_dict(c) for c in d["children"]])


def is_heldout(conv_id: str, seed: int, percent: float) -> bool:
    """Split by conversation with a seeded hash, so every turn of a conversation lands together."""
    h = hashlib.sha256(f"{seed}:{conv_id}".encode()).hexdigest()
    return int(h[:8], 16) % 10000 < percent * 100


def classify(prompt: str, answer: str, cfg: DataConfig) -> tuple[str, Tree | None] | None:
    """("structured", tree) | ("unstructured", None) | None (dropped)."""
    tree = rewrite_list(answer)
    if tree is None and cfg.paragraphs:
        tree = rewrite_paragraphs(answer)
    cue = LIST_CUE.search(prompt) is not None
    if tree is not None:
        return ("structured", tree) if (cue or not cfg.cue_filter) else None
    if has_numbered_list(answer) or (cfg.cue_filter and cue):
        return None
    return "unstructured", None


def iter_items(cfg: DataConfig, path: Path | None = None) -> Iterator[Item]:
    text = (path or dataset_file()).read_text(encoding="utf-8")
    for rec in iter_records(text):
        conv = str(rec.get("id", "")).split("_")[0]
        turns = rec.get("conversations") or []
        for i, (a, b) in enumerate(zip(turns, turns[1:], strict=False)):
            if a.get("from") != "human" or b.get("from") != "gpt":
                continue
            prompt, answer = str(a.get("value", "")).strip(), str(b.get("value", "")).strip()
            if (
                not prompt
                or not answer
                or len(prompt) > cfg.max_prompt_chars
                or len(answer) > cfg.max_answer_chars
            ):
                continue
            if not (is_english(prompt) and is_english(answer)):
                continue
            got = classify(prompt, answer, cfg)
            if got is None:
                continue
            kind, tree = got
            yield Item(
                f"{rec.get('id', '')}:{i}", conv, kind, prompt, answer, tree_to_dict(tree) if tree else None
            )


def build(out_dir: Path, cfg: DataConfig, path: Path | None = None) -> dict:
    """Write train.jsonl / heldout.jsonl / tokenizer/ under out_dir and return the stats."""
    from apar_train.tokenizer import save_tokenizer, train_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    train, held = [], []
    seen: set[tuple[str, str]] = set()
    for item in iter_items(cfg, path):
        key = (item.prompt, item.answer)
        if key in seen:  # ShareGPT has duplicate conversations; keep one copy
            continue
        seen.add(key)
        (held if is_heldout(item.conv, cfg.seed, cfg.heldout_percent) else train).append(item)
    random.Random(cfg.seed).shuffle(train)
    for name, items in (("train", train), ("heldout", held)):
        with (out_dir / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps(asdict(it), ensure_ascii=False) + "\n")
    tok = train_tokenizer((t for it in train for t in (it.prompt, it.answer)), cfg.vocab_size)
    save_tokenizer(tok, out_dir / "tokenizer")
    (out_dir / "data_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    stats = compute_stats(train, held, tok)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def load_items(path: Path) -> list[Item]:
    with path.open(encoding="utf-8") as f:
        return [Item(**json.loads(line)) for line in f if line.strip()]


def compute_stats(train: list[Item], held: list[Item], tok) -> dict:
    from apar_train.examples import tree_token_counts

    def n_struct(items: list[Item]) -> int:
        return sum(it.kind == "structured" for it in items)

    structured = [it for it in train + held if it.kind == "structured"]
    branches = [tree_from_dict(it.tree).num_branches - 1 for it in structured]
    ratios, roundtrip_ok = [], 0
    for it in held:
        if it.kind != "structured":
            continue
        tree = tree_from_dict(it.tree)
        roundtrip_ok += assemble(tree) == it.answer
        longest, total = tree_token_counts(tok, tree)
        ratios.append(longest / total)
    return {
        "train_turns": len(train),
        "heldout_turns": len(held),
        "conversations": len({it.conv for it in train + held}),
        "structured_fraction": round((n_struct(train) + n_struct(held)) / max(1, len(train) + len(held)), 4),
        "train_structured": n_struct(train),
        "heldout_structured": n_struct(held),
        "branches_per_structured_answer": round(sum(branches) / max(1, len(branches)), 3),
        "oracle_step_ratio_heldout": round(sum(ratios) / max(1, len(ratios)), 4),
        "heldout_roundtrip_exact": f"{roundtrip_ok}/{len(ratios)}",
    }


def write_heldout_prompts(data_dir: Path, out: Path, per_kind: int = 60, seed: int = 0) -> int:
    """Ship a small, seeded sample of held-out turns for `apar eval` and the benchmarks.

    Lines are {"id", "kind", "prompt"} plus the reference "answer" and "tree", so eval can
    compute the oracle step ratio and the held-out loss without rebuilding the data.
    """
    items = load_items(data_dir / "heldout.jsonl")
    rng = random.Random(seed)
    chosen: list[Item] = []
    for kind in ("structured", "unstructured"):
        pool = [it for it in items if it.kind == kind]
        rng.shuffle(pool)
        pool.sort(key=lambda it: not it.id.endswith(":0"))  # first turns (self-contained) first
        chosen += pool[:per_kind]
    with out.open("w", encoding="utf-8") as f:
        for it in chosen:
            row = {"id": it.id, "kind": it.kind, "prompt": it.prompt, "answer": it.answer, "tree": it.tree}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(chosen)
