"""Small hand-written training data for the training tests (no ShareGPT, no downloads)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from apar_train.config import ModelConfig, RunConfig, TrainConfig
from apar_train.data import Item, tree_to_dict
from apar_train.rewrite import rewrite_list
from apar_train.tokenizer import save_tokenizer, train_tokenizer

TOPICS = ["health", "travel", "study", "cooking", "saving money", "sleep"]


def list_answer(topic: str) -> str:
    items = [
        f"{i}. Tip {i} for {topic}: Keep doing the {topic} habit number {i} every day and note how it goes."
        for i in range(1, 4)
    ]
    return f"Here are some tips for {topic}:\n\n" + "\n".join(items) + "\n\nGood luck!"


def make_items() -> list[Item]:
    items = []
    for n, topic in enumerate(TOPICS):
        ans = list_answer(topic)
        tree = rewrite_list(ans)
        assert tree is not None
        items.append(
            Item(
                f"s{n}:0", f"s{n}", "structured", f"What are some tips for {topic}?", ans, tree_to_dict(tree)
            )
        )
        items.append(
            Item(
                f"u{n}:0",
                f"u{n}",
                "unstructured",
                f"Write one line about {topic}.",
                f"{topic.title()} matters.",
                None,
            )
        )
    return items


def make_data_dir(root: Path) -> Path:
    """train.jsonl + heldout.jsonl + a byte-level BPE tokenizer trained on them."""
    items = make_items()
    root.mkdir(parents=True, exist_ok=True)
    for name in ("train", "heldout"):
        with (root / f"{name}.jsonl").open("w") as f:
            for it in items:
                f.write(json.dumps(asdict(it)) + "\n")
    tok = train_tokenizer((t for it in items for t in (it.prompt, it.answer)), vocab_size=400)
    save_tokenizer(tok, root / "tokenizer")
    return root


def tiny_run_config(data_dir: Path, tmp: Path, mode: str, **train) -> RunConfig:
    """A 2-layer, 32-wide run that trains in seconds on CPU; `train` sets TrainConfig fields."""
    return RunConfig(
        name=f"tiny-{mode}",
        mode=mode,
        data_dir=str(data_dir),
        out_dir=str(tmp / f"model-{mode}"),
        run_dir=str(tmp / f"run-{mode}"),
        model=ModelConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=256,
        ),
        train=TrainConfig(**{"batch_turns": 4, "lr": 1e-2, "warmup": 2, "max_seq_len": 256, **train}),
    )
