"""`apar train --config FILE`: train an APAR model (or its sequential twin) and export it.

Both modes draw the same turns in the same order (seeded per step), so the twin sees exactly
the answers the APAR model sees, only in reading order and without control tokens; the
budget is the same number of steps and turns per step. Checkpoints (model + optimizer +
step) make a run resumable; the final model is written as a Hugging Face directory.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from apar_worker.model_runner import pick_device
from apar_worker.training.data import DataConfig, Item, build, load_items, tree_from_dict
from apar_worker.training.examples import (
    IGNORE,
    Example,
    PackedTree,
    apar_examples,
    pack_tree,
    plain_example,
    seq_example,
    special_ids,
)
from apar_worker.training.tokenizer import load_tokenizer, prompt_ids


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


Row = Example | PackedTree


def item_examples(tok, item: Item, mode: str, ids, packed: bool = True) -> list[Row]:
    """A turn's training rows: one causal row, or (APAR) one packed tree / one row per branch."""
    p = prompt_ids(tok, item.prompt)
    if item.tree is None:
        return [plain_example(tok, p, item.answer, ids)]
    tree = tree_from_dict(item.tree)
    if mode == "seq":
        return [seq_example(tok, p, tree, item.answer, ids)]
    return [pack_tree(tok, p, tree, ids)] if packed else list(apar_examples(tok, p, tree, ids))


def turn_length(rows: list[Row], item: Item) -> int:
    """prompt + answer text + EOS + 2 per child, whatever the mode: both modes keep the same turns.

    (A packed tree is prompt + text + a [Fork] and a [Child] per child; the twin's row is
    prompt + text + EOS.)
    """
    if item.tree is None:
        return len(rows[0])
    if isinstance(rows[0], PackedTree):
        return len(rows[0]) + 1
    n = len(tree_from_dict(item.tree).children)
    if len(rows) == 1:
        return len(rows[0]) + 2 * n
    return sum(n_targets(r) for r in rows) + len(rows[0]) - n_targets(rows[0])  # per-branch rows


def n_targets(row: Row) -> int:
    if isinstance(row, PackedTree):
        return sum(t != IGNORE for t in row.targets)
    return sum(t != IGNORE for t in row.labels[1:])


def base_dir(init_from: str) -> Path:
    """A preparable base model name (prepared on first use) or a local HF directory."""
    from apar_worker.base_models import BASE_MODELS, ensure_base

    if init_from in BASE_MODELS:
        return ensure_base(init_from)
    return Path(init_from)


def build_model(cfg: RunConfig, tok):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.model.init_from:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir(cfg.model.init_from)), dtype=torch.float32)
        base_vocab = model.get_input_embeddings().weight.shape[0]
        if len(tok) > base_vocab:
            torch.manual_seed(cfg.train.seed)
            model.resize_token_embeddings(len(tok), mean_resizing=True)
        if cfg.model.lora_r > 0:
            from apar_worker.adapters import AdapterConfig, apply_lora, train_new_rows

            model.apar_adapter = AdapterConfig(
                base=cfg.model.init_from,
                r=cfg.model.lora_r,
                alpha=cfg.model.lora_alpha,
                base_vocab_size=base_vocab,
                vocab_size=len(tok),
            )
            torch.manual_seed(cfg.train.seed)
            apply_lora(model, model.apar_adapter)
            train_new_rows(model, base_vocab)
        return model
    m = cfg.model
    conf = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        intermediate_size=m.intermediate_size,
        max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_theta=10000.0,
    )
    torch.manual_seed(cfg.train.seed)
    return LlamaForCausalLM(conf)


def micro_batches(examples: list[Row], micro_tokens: int) -> list[list[Row]]:
    """Group length-sorted rows of one kind so each padded micro-batch stays under micro_tokens."""
    groups: list[list[Row]] = []
    for kind in (Example, PackedTree):
        start = len(groups)
        for ex in sorted((e for e in examples if isinstance(e, kind)), key=len):
            if len(groups) > start and (len(groups[-1]) + 1) * len(ex) <= micro_tokens:
                groups[-1].append(ex)
            else:
                groups.append([ex])
    return groups


def collate_packed(group: list[PackedTree], pad_id: int, device):
    """Right-padded packed trees with their [B, 1, T, T] tree masks and explicit positions."""
    n = max(len(e) for e in group)
    inp = torch.full((len(group), n), pad_id, dtype=torch.long)
    pos = torch.zeros((len(group), n), dtype=torch.long)
    tgt = torch.full((len(group), n), IGNORE, dtype=torch.long)
    mask = torch.stack([e.attention_mask(n) for e in group])[:, None]
    for i, e in enumerate(group):
        inp[i, : len(e)] = torch.tensor(e.input_ids)
        pos[i, : len(e)] = torch.tensor(e.position_ids)
        tgt[i, : len(e)] = torch.tensor(e.targets)
    return inp.to(device), pos.to(device), tgt.to(device), mask.to(device)


def packed_loss_sum(model, inp, pos, tgt, mask, t: TrainConfig | None = None) -> torch.Tensor:
    """Summed loss of packed trees: targets are already aligned (next token in the same branch)."""
    hidden = model.base_model(input_ids=inp, attention_mask=mask, position_ids=pos).last_hidden_state
    return weighted_loss(model, hidden, tgt, t)


def opening_weights(target: torch.Tensor, t: TrainConfig | None) -> torch.Tensor:
    """1 per labelled position, `opening_weight` on each row's first `opening_tokens` of them.

    In every row kind the first labelled positions are the answer's opening (a packed tree
    lays out the root before its children), so both modes weight the same text tokens.
    """
    labelled = target != IGNORE
    w = labelled.float()
    if t is not None and t.opening_tokens > 0 and t.opening_weight != 1.0:
        rank = labelled.long().cumsum(dim=1)
        w = torch.where(labelled & (rank <= t.opening_tokens), torch.full_like(w, t.opening_weight), w)
    return w


def weighted_loss(model, hidden: torch.Tensor, target: torch.Tensor, t: TrainConfig | None) -> torch.Tensor:
    """Cross-entropy of labelled positions only: the LM head never runs on prompt or pad tokens."""
    w = opening_weights(target, t)
    keep = target != IGNORE
    logits = model.get_output_embeddings()(hidden[keep])
    ce = torch.nn.functional.cross_entropy(logits.float(), target[keep], reduction="none")
    return (ce * w[keep]).sum()


def collate(group: list[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(e) for e in group)
    inp = torch.full((len(group), n), pad_id, dtype=torch.long)
    lab = torch.full((len(group), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(group), n), dtype=torch.long)
    for i, e in enumerate(group):
        inp[i, : len(e)] = torch.tensor(e.input_ids)
        lab[i, : len(e)] = torch.tensor(e.labels)
        mask[i, : len(e)] = 1
    return inp.to(device), lab.to(device), mask.to(device)


def loss_sum(
    model, inp: torch.Tensor, lab: torch.Tensor, t: TrainConfig | None = None
) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over labelled positions, and how many there were.

    Rows are right-padded, so under the causal mask no real token ever sees a pad: no padding
    mask is needed, which keeps attention on the fast fused causal path.
    """
    hidden = model.base_model(input_ids=inp).last_hidden_state[:, :-1]
    target = lab[:, 1:]
    return weighted_loss(model, hidden, target, t), int((target != IGNORE).sum())


def lr_at(step: int, t: TrainConfig) -> float:
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    progress = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


Turn = tuple[str, list[Row], int]  # (kind, rows, turn length)


def prepare(cfg: RunConfig) -> tuple[object, list[Turn]]:
    """Load (building if needed) the data and tokenizer; tokenise every training turn once."""
    data_dir = Path(cfg.data_dir)
    if not (data_dir / "train.jsonl").is_file():
        build(data_dir, cfg.data)
    tok = run_tokenizer(cfg)
    ids = special_ids(tok)
    turns: list[Turn] = []
    for item in load_items(data_dir / "train.jsonl"):
        exs = item_examples(tok, item, cfg.mode, ids)
        turns.append((item.kind, exs, turn_length(exs, item)))
    return tok, turns


def run_tokenizer(cfg: RunConfig):
    """A from-scratch run uses the data build's tokenizer; a fine-tune the base's plus ours."""
    if not cfg.model.init_from:
        return load_tokenizer(Path(cfg.data_dir) / "tokenizer")
    from transformers import AutoTokenizer

    from apar_worker.training.tokenizer import add_apar_tokens

    tok = AutoTokenizer.from_pretrained(str(base_dir(cfg.model.init_from)))
    add_apar_tokens(tok)
    return tok


def make_pools(turns: list[Turn], t: TrainConfig, data_dir: str) -> dict[str, list[list[Row]]]:
    """A stage's turns by kind: those within its max_seq_len, cut after the opening if asked."""
    pools: dict[str, list[list[Row]]] = {"structured": [], "unstructured": []}
    for kind, exs, length in turns:
        if length <= t.max_seq_len:
            pools[kind].append(
                [cut_after_opening(e, t.opening_tokens) for e in exs] if t.opening_only else exs
            )
    if not pools["structured"] or not pools["unstructured"]:
        raise ValueError(f"{data_dir}: need both structured and unstructured training turns")
    return pools


def cut_after_opening(row: Row, n: int) -> Row:
    """The row up to its n-th labelled token: the prompt and the answer's opening only.

    A packed tree lays out the root first, so its cut keeps the root's opening; `prev` and
    positions of the kept tokens are unchanged.
    """
    if n <= 0:
        raise ValueError("opening_only needs opening_tokens > 0")
    targets = row.targets if isinstance(row, PackedTree) else row.labels
    labelled = [i for i, t in enumerate(targets) if t != IGNORE]
    if len(labelled) <= n:
        return row
    end = labelled[n - 1]
    if isinstance(row, PackedTree):
        return PackedTree(
            row.input_ids[: end + 1], row.position_ids[: end + 1], row.prev[: end + 1], row.targets[: end + 1]
        )
    return Example(row.input_ids[: end + 1], row.labels[: end + 1])


def sample_step(pools: dict[str, list[list[Row]]], t: TrainConfig, step: int) -> list[Row]:
    """The step's turns depend only on (seed, step): both modes and resumed runs draw the same."""
    rng = random.Random(t.seed * 1_000_003 + step)
    out: list[Row] = []
    for _ in range(t.batch_turns):
        pool = pools["structured"] if rng.random() < t.structured_share else pools["unstructured"]
        out += pool[rng.randrange(len(pool))]
    return out


def train(cfg: RunConfig, progress: bool = True) -> dict:
    """Train (resuming from the run's checkpoints), then the `decide` stage if any, and export."""
    t = cfg.train
    torch.set_num_threads(t.threads)
    device = pick_device(t.device)
    tok, turns = prepare(cfg)  # tokenised once, shared by both stages
    if cfg.model.init_from:
        print(f"{cfg.name}: {len(turns)} training turns tokenised", flush=True)
    model = build_model(cfg, tok).to(device)
    info = run_stage(
        model, tok, make_pools(turns, t, cfg.data_dir), t, Path(cfg.run_dir), cfg.name, device, progress
    )
    if cfg.decide is not None:
        pools = make_pools(turns, cfg.decide, cfg.data_dir)
        run_dir = Path(cfg.run_dir) / "decide"
        info["decide"] = run_stage(
            model, tok, pools, cfg.decide, run_dir, f"{cfg.name} decide", device, progress
        )
    export(cfg, model, tok, info)
    return info


def run_stage(model, tok, pools, t: TrainConfig, run_dir: Path, name: str, device, progress: bool) -> dict:
    """One stage's optimiser loop with resumable checkpoints in run_dir; trains `model` in place."""
    opt = torch.optim.AdamW(param_groups(model, t), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "ckpt.pt"
    step, history, last_tps, prior_s = 0, [], None, 0.0
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        load_trainable(model, state["model"])
        opt.load_state_dict(state["optim"])
        step, history = state["step"], state.get("history", [])
        last_tps = state.get("tokens_per_s")
        prior_s = state.get("elapsed_s", 0.0)
    model.train()
    start, tokens_seen, stopped_early = time.monotonic(), 0, False
    bar = tqdm(total=t.steps, initial=step, disable=not progress, desc=name, mininterval=2.0)
    while step < t.steps:
        if t.max_minutes is not None and time.monotonic() - start > t.max_minutes * 60:
            stopped_early = True
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t) * g.get("lr_scale", 1.0)
        examples = sample_step(pools, t, step)
        n_label = sum(n_targets(e) for e in examples)
        total = 0.0
        for group in micro_batches(examples, t.micro_tokens):
            if isinstance(group[0], PackedTree):
                inp, pos, tgt, mask = collate_packed(group, tok.pad_token_id, device)
                loss = packed_loss_sum(model, inp, pos, tgt, mask, t)
            else:
                inp, lab, _ = collate(group, tok.pad_token_id, device)
                loss, _ = loss_sum(model, inp, lab, t)
            (loss / n_label).backward()
            total += loss.item()
            tokens_seen += sum(len(e) for e in group)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        history.append(round(total / n_label, 4))
        tps = last_tps = tokens_seen / max(1e-6, time.monotonic() - start)
        bar.set_postfix(loss=f"{history[-1]:.3f}", tok_s=f"{tps:.0f}")
        bar.update(1)
        if step % t.checkpoint_every == 0 or step == t.steps:
            save_checkpoint(ckpt, model, opt, step, history, last_tps, prior_s + time.monotonic() - start)
    bar.close()
    elapsed_s = prior_s + time.monotonic() - start
    save_checkpoint(ckpt, model, opt, step, history, last_tps, elapsed_s)
    return {
        "steps": step,
        "planned_steps": t.steps,
        "stopped_early": stopped_early,
        "final_train_loss": round(sum(history[-20:]) / max(1, len(history[-20:])), 4),
        "tokens_per_s": round(last_tps, 1) if last_tps is not None else None,
        "minutes": round(elapsed_s / 60, 1),
    }


# The new token rows start from the mean embedding and must become distinct tokens within a
# short run; the LoRA factors only nudge a trained model. So the rows learn faster.
NEW_ROWS_LR_SCALE = 5.0


def param_groups(model, t: TrainConfig) -> list[dict]:
    """What the optimiser trains; the embedding rows of an adapter run get no weight decay
    (decay would also shrink the frozen base rows, whose gradient is masked to zero)."""
    adapter = getattr(model, "apar_adapter", None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if adapter is None:
        return [{"params": trainable}]
    from apar_worker.adapters import token_row_weights

    rows = list(token_row_weights(model).values())
    return [
        {"params": [p for p in trainable if all(p is not r for r in rows)]},
        {"params": rows, "weight_decay": 0.0, "lr_scale": NEW_ROWS_LR_SCALE},
    ]


def trainable_state(model) -> dict:
    """What a checkpoint keeps: the whole model, or only the adapter (tens of MB, not 540)."""
    adapter = getattr(model, "apar_adapter", None)
    if adapter is None:
        return model.state_dict()
    from apar_worker.adapters import adapter_state

    return adapter_state(model, adapter)


def load_trainable(model, state: dict) -> None:
    adapter = getattr(model, "apar_adapter", None)
    if adapter is None:
        model.load_state_dict(state)
        return
    from apar_worker.adapters import load_adapter_state

    load_adapter_state(model, state, adapter)


def save_checkpoint(
    path: Path,
    model,
    opt,
    step: int,
    history: list[float],
    tokens_per_s: float | None = None,
    elapsed_s: float = 0.0,
) -> None:
    tmp = path.with_suffix(".tmp")
    weights = trainable_state(model)
    state = {"model": weights, "optim": opt.state_dict(), "step": step, "history": history}
    torch.save({**state, "tokens_per_s": tokens_per_s, "elapsed_s": elapsed_s}, tmp)
    tmp.replace(path)
    # Weights-only snapshot per checkpoint: a twin can be exported at the step its APAR peer
    # stopped at (same steps, same turns), and any run can be inspected later.
    torch.save({"model": weights, "step": step, "history": history}, path.parent / f"snap-{step:05d}.pt")


def export_snapshot(cfg: RunConfig, step: int) -> Path:
    """Export the model as it was at `step` (from its snapshot) instead of the final one."""
    snap = Path(cfg.run_dir) / f"snap-{step:05d}.pt"
    if not snap.is_file():
        raise ValueError(f"no snapshot for step {step} in {cfg.run_dir}")
    tok = run_tokenizer(cfg)
    model = build_model(cfg, tok)
    state = torch.load(snap, map_location="cpu", weights_only=False)
    load_trainable(model, state["model"])
    history = state["history"]
    info = {
        "steps": step,
        "planned_steps": cfg.train.steps,
        "stopped_early": step < cfg.train.steps,
        "final_train_loss": round(sum(history[-20:]) / max(1, len(history[-20:])), 4),
        "tokens_per_s": None,
    }
    return export(cfg, model, tok, info)


def export(cfg: RunConfig, model, tok, info: dict) -> Path:
    """Write a self-contained HF model directory: weights, config, tokenizer, generation config, card."""
    from apar_worker.training.card import write_card

    out = Path(cfg.out_dir)
    if out.exists():
        for p in out.iterdir():
            if p.is_file():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    adapter = getattr(model, "apar_adapter", None)
    if adapter is not None:  # only the delta ships; the registry assembles it onto the base
        from apar_worker.adapters import adapter_state, save_adapter

        save_adapter(out, adapter_state(model, adapter), adapter)
    else:
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.bos_token_id = None
        model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    data_stats = Path(cfg.data_dir) / "stats.json"
    if data_stats.is_file():
        shutil.copy(data_stats, out / "data_stats.json")
    (out / "training.json").write_text(
        json.dumps({"config": asdict(cfg), "result": info}, indent=2, default=str) + "\n"
    )
    write_card(out, cfg.name, cfg.mode, asdict(cfg), info)
    return out
