"""`apar train --config FILE`: train an APAR model (or its sequential twin) and export it.

Both modes draw the same turns in the same order (seeded per step), so the twin sees exactly
the answers the APAR model sees, only in reading order and without control tokens; the
budget is the same number of steps and turns per step. Checkpoints (model + optimizer +
step) make a run resumable; the final model is written as a Hugging Face directory.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from apar_train.batches import Turn, item_examples, make_pools, sample_step, step_loss, turn_length
from apar_train.config import RunConfig, TrainConfig
from apar_train.data import build, load_items
from apar_train.examples import special_ids
from apar_train.tokenizer import load_tokenizer
from apar_worker.model_runner import pick_device


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


def lr_at(step: int, t: TrainConfig) -> float:
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    progress = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


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

    from apar_train.tokenizer import add_apar_tokens

    tok = AutoTokenizer.from_pretrained(str(base_dir(cfg.model.init_from)))
    add_apar_tokens(tok)
    return tok


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
        loss = step_loss(model, examples, t, tok.pad_token_id, device)
        tokens_seen += sum(len(e) for e in examples)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        history.append(round(loss, 4))
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
    from apar_train.card import write_card

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
