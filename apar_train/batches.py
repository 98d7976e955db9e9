"""Training rows and their loss: turns -> rows, a step's draw, micro-batches, collation, loss.

Both modes draw the same turns in the same order (`sample_step` is seeded per step), so the twin
sees exactly the answers the APAR model sees, only in reading order and without control tokens.
"""

from __future__ import annotations

import random

import torch

from apar_train.config import TrainConfig
from apar_train.data import Item, tree_from_dict
from apar_train.examples import (
    IGNORE,
    Example,
    PackedTree,
    apar_examples,
    pack_tree,
    plain_example,
    seq_example,
)
from apar_train.tokenizer import prompt_ids

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


Turn = tuple[str, list[Row], int]  # (kind, rows, turn length)


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


def step_loss(model, examples: list[Row], t: TrainConfig, pad_id: int, device) -> float:
    """Forward and backward of one step's rows in micro-batches; the mean loss per label."""
    n_label = sum(n_targets(e) for e in examples)
    total = 0.0
    for group in micro_batches(examples, t.micro_tokens):
        if isinstance(group[0], PackedTree):
            inp, pos, tgt, mask = collate_packed(group, pad_id, device)
            loss = packed_loss_sum(model, inp, pos, tgt, mask, t)
        else:
            inp, lab, _ = collate(group, pad_id, device)
            loss, _ = loss_sum(model, inp, lab, t)
        (loss / n_label).backward()
        total += loss.item()
    return total / n_label
