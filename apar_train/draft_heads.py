"""`apar train --config NAME --draft-heads`: fit draft heads on the model's own answers.

1. The model answers training-split prompts (greedy, forking, batched on our engine): its own
   outputs, so the heads learn what it will say, not what ShareGPT said (Medusa's
   self-distillation). Held-out prompts are never used: `apar bench speed` reads them.
2. The engine hands over the last hidden state behind every token it samples (`Recorder`).
3. Head k learns the token the model produced at t + 2 + k from the state at t, over the draft
   vocabulary (the answers' most frequent tokens); the output embedding stays frozen.
The heads file is written next to the shipped model (apar_worker/draft_heads.py reads it).
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from apar_worker.draft_heads import HEADS_FILE, DraftHeads, output_matrix
from apar_worker.sequence import Branch
from apar_worker.types import GenerateRequest, SamplingParams


@dataclass
class HeadsConfig:
    model: str = "apar-smol"
    num_prompts: int = 320
    max_tokens: int = 320
    num_heads: int = 3
    vocab_size: int = 8192  # draft vocabulary: the answers' most frequent tokens
    epochs: int = 4
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    cache: Path | None = None  # recorded states saved here; reused instead of answering again


def training_prompts(n: int, seed: int) -> list[str]:
    """Training-split prompts of the shipped data build (structured ones first, as the
    benchmarks ask those), never a held-out conversation."""
    from apar_train.data import DataConfig, is_heldout, iter_items

    cfg = DataConfig()
    structured, other = [], []
    for item in iter_items(cfg):
        if is_heldout(item.conv, cfg.seed, cfg.heldout_percent):
            continue
        (structured if item.kind == "structured" else other).append(item.prompt)
        if len(structured) >= n and len(other) >= n:
            break
    rng = random.Random(seed)
    rng.shuffle(structured)
    rng.shuffle(other)
    k = min(len(structured), math.ceil(n * 3 / 4))
    return structured[:k] + other[: n - k]


class Recorder:
    """A proposer that proposes nothing and keeps the hidden state behind every token the
    engine samples for its requests: the heads' inputs, with no second forward pass."""

    def __init__(self) -> None:
        self.rows: list[tuple[Branch, int, torch.Tensor]] = []  # (branch, position t, state at t)
        self.requests: list[str] = []  # the request of each row: validation is split by prompt

    def observe(self, rows, hidden: torch.Tensor) -> None:
        for (state, br), h in zip(rows, hidden, strict=True):
            self.rows.append((br, len(br.tokens) - 2, h.clone()))  # state at t gave token t + 1
            self.requests.append(state.request_id)

    def propose(self, state, br, k) -> list[int]:
        return []

    def groups(self) -> torch.Tensor:
        """[N] an integer per request, for a validation split by prompt."""
        ids: dict[str, int] = {}
        return torch.tensor([ids.setdefault(r, len(ids)) for r in self.requests], dtype=torch.long)

    def examples(self, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [N, H] and targets [N, num_heads]: the token each branch produced at
        t + 2 + k in the end (-1 past its end)."""
        hidden = torch.stack([h for _, _, h in self.rows])
        targets = torch.full((len(self.rows), num_heads), -1, dtype=torch.long)
        for i, (br, t, _) in enumerate(self.rows):
            for k in range(num_heads):
                if t + 2 + k < len(br.tokens):
                    targets[i, k] = br.tokens[t + 2 + k]
        return hidden, targets


def answer(engine, prompts: list[str], max_tokens: int, progress: bool) -> int:
    """The model's greedy answers, 16 at a time, recorded; returns the tokens generated."""
    tokens = 0
    for i in range(0, len(prompts), 16):
        reqs = [
            GenerateRequest(
                messages=[{"role": "user", "content": p}],
                sampling=SamplingParams(max_tokens=max_tokens),
                speculative="draft_heads",  # the recorder sees these requests' steps
            )
            for p in prompts[i : i + 16]
        ]
        tokens += sum(o.num_tokens for o in engine.generate(reqs))
        if progress:
            print(
                f"apar: draft heads: {min(i + 16, len(prompts))}/{len(prompts)} answers, {tokens} tokens",
                flush=True,
            )
    return tokens


def draft_vocab(targets: torch.Tensor, size: int, keep: list[int]) -> torch.Tensor:
    counts = torch.bincount(targets[:, 0][targets[:, 0] >= 0])
    top = torch.argsort(counts, descending=True)[:size]
    top = top[counts[top] > 0]
    return torch.unique(torch.cat([top, torch.tensor(keep, dtype=torch.long)]))


def fit(heads: DraftHeads, hidden, targets, groups, weight, cfg: HeadsConfig, progress: bool) -> list[float]:
    """Cross-entropy of every head over the draft vocabulary. Validation holds out every tenth
    prompt (`groups`: neighbouring positions of one answer look alike, so a split by position
    would flatter the heads); the epoch with the best validation top-1 is kept and its per-head
    accuracy returned."""
    y = in_vocab(targets, heads.vocab, weight.shape[0])
    g = torch.Generator().manual_seed(cfg.seed)
    held = groups % 10 == 9
    val, train = torch.nonzero(held).flatten(), torch.nonzero(~held).flatten()
    if len(val) == 0:
        val = train
    emb = weight.detach()[heads.vocab]
    opt = torch.optim.AdamW(heads.blocks.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best: tuple[float, dict, list[float]] = (-1.0, {}, [])
    total = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=total, pct_start=0.05)
    start = time.monotonic()
    for epoch in range(cfg.epochs):
        perm = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            logits = heads.states(hidden[idx]) @ emb.T  # [K, B, V']
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].T.flatten(), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(heads, hidden[val], y[val], emb)
        if sum(acc) > best[0]:
            best = (sum(acc), copy.deepcopy(heads.state_dict()), acc)
        if progress:
            print(
                f"apar: draft heads: epoch {epoch + 1}/{cfg.epochs} loss {loss.item():.3f} "
                f"val top-1 {', '.join(f'{a:.2f}' for a in acc)} ({time.monotonic() - start:.0f} s)",
                flush=True,
            )
    heads.load_state_dict(best[1])
    return best[2]


def in_vocab(targets: torch.Tensor, vocab: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token ids -> indices in the draft vocabulary; -100 (ignored) past the end or outside it."""
    remap = torch.full((vocab_size,), -100, dtype=torch.long)
    remap[vocab] = torch.arange(len(vocab))
    return torch.where(targets >= 0, remap[targets.clamp(min=0)], torch.full_like(targets, -100))


@torch.no_grad()
def accuracy(heads: DraftHeads, hidden, y, emb) -> list[float]:
    pred = (heads.states(hidden) @ emb.T).argmax(-1)  # [K, N]
    out = []
    for k in range(heads.num_heads):
        ok = y[:, k] != -100
        out.append(float((pred[k][ok] == y[ok, k]).float().mean()) if ok.any() else 0.0)
    return out


def train_heads(cfg: HeadsConfig, out_dir: Path, progress: bool = True) -> dict:
    from apar_worker.engine import Engine, EngineConfig

    torch.manual_seed(cfg.seed)
    prompts = training_prompts(cfg.num_prompts, cfg.seed)
    config = EngineConfig(model=cfg.model, device="cpu", kv_cache_memory_mb=256)
    if cfg.cache is not None and cfg.cache.is_file():
        saved = torch.load(cfg.cache)
        hidden, targets, groups = saved["hidden"].float(), saved["targets"], saved["groups"]
        answer_tokens, keep, weight = saved["answer_tokens"], saved["keep"], saved["weight"]
        if progress:
            print(f"apar: draft heads: {len(hidden)} recorded states from {cfg.cache}", flush=True)
    else:
        recorder = Recorder()
        engine = Engine(config, proposers={"draft_heads": recorder})
        keep = [i for i in (engine.fork_id, engine.child_id) if i is not None]
        answer_tokens = answer(engine, prompts, cfg.max_tokens, progress)
        hidden, targets = recorder.examples(cfg.num_heads)
        groups = recorder.groups()
        weight = output_matrix(engine.runner.model).detach()
        if cfg.cache is not None:
            cfg.cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"hidden": hidden.half(), "targets": targets, "groups": groups, "keep": keep,
                        "answer_tokens": answer_tokens, "weight": weight}, cfg.cache)  # fmt: skip
    heads = DraftHeads(hidden.shape[1], cfg.num_heads, draft_vocab(targets, cfg.vocab_size, keep))
    acc = fit(heads, hidden, targets, groups, weight, cfg, progress)
    info = {
        "model": cfg.model,
        "prompts": len(prompts),
        "answer_tokens": answer_tokens,
        "examples": len(hidden),
        "draft_vocab": len(heads.vocab),
        "epochs": cfg.epochs,
        "val_top1": [round(a, 4) for a in acc],
    }
    path = out_dir / HEADS_FILE
    heads.half().save(path, info)
    return {"path": str(path), **info}
