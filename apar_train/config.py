"""A training run's YAML config: the model to build or fine-tune, the stage(s) to run, the data.

`apar_train/configs/*.yaml` are the shipped runs; `load_config` turns one into these dataclasses
and rejects unknown keys with the file's name in the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from apar_train.data import DataConfig


@dataclass
class ModelConfig:
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 704
    max_position_embeddings: int = 1024
    init_from: str | None = None  # a base model name or local HF checkpoint to fine-tune
    # LoRA rank on the linear layers (0 = train every weight); with a base, the new token rows
    # ([Fork], [Child]) always train, and only the adapter is exported (see adapters.py).
    lora_r: int = 0
    lora_alpha: float = 32.0


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_turns: int = 8
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    micro_tokens: int = 4096
    structured_share: float = 0.5
    # The opening of an answer (its first labelled tokens) is where the model decides between
    # a list (and so forking) and prose; weighting it up teaches that decision sooner.
    opening_tokens: int = 0
    opening_weight: float = 1.0
    opening_only: bool = False  # cut every row after its opening: a cheap fork-decision stage
    max_seq_len: int = 768
    seed: int = 0
    threads: int = 1
    checkpoint_every: int = 100
    max_minutes: float | None = None  # stop early (and say so in the model card) past this
    device: str = "auto"


@dataclass
class RunConfig:
    name: str
    mode: str  # "apar" | "seq"
    data_dir: str = "data/sharegpt-apar"
    out_dir: str = "runs/model"
    run_dir: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Optional second stage from the first one's final weights (fresh optimizer), e.g. a short
    # `opening_only` stage that sharpens the list-or-prose decision; checkpoints in run_dir/decide.
    decide: TrainConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)


def load_config(path: Path) -> RunConfig:
    raw = yaml.safe_load(path.read_text()) or {}
    if raw.get("mode") not in ("apar", "seq"):
        raise ValueError(f"{path}: mode must be 'apar' or 'seq', got {raw.get('mode')!r}")
    try:
        return RunConfig(
            **{k: v for k, v in raw.items() if k not in ("model", "train", "decide", "data")},
            model=ModelConfig(**(raw.get("model") or {})),
            train=TrainConfig(**(raw.get("train") or {})),
            decide=TrainConfig(**raw["decide"]) if raw.get("decide") else None,
            data=DataConfig(**(raw.get("data") or {})),
        )
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from exc
