"""Turn an answer tree into training examples whose visibility equals decoding visibility.

One example per branch (docs/design.md, "Training data"): a child sees the prompt, its ancestors' tokens through
its own `[Fork]` (earlier titles and forks included, earlier siblings' bodies excluded), then
`[Child]` at the next position; loss falls only on the branch's own sampled tokens (+ EOS).
Positions are contiguous, exactly what the engine gives a forked branch. The sequential twin
gets one example with the same text tokens in reading order and no control tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from apar_train.rewrite import Tree
from apar_train.tokenizer import CHILD, FORK, encode_text

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Ids:
    fork: int
    child: int
    eos: int


def special_ids(tok) -> Ids:
    return Ids(tok.convert_tokens_to_ids(FORK), tok.convert_tokens_to_ids(CHILD), tok.eos_token_id)


def branch_tokens(tok, tree: Tree, ids: Ids) -> tuple[list[int], list[int]]:
    """A branch's sampled tokens (segments joined by [Fork], then EOS) and each fork's index."""
    out: list[int] = []
    forks: list[int] = []
    for i, seg in enumerate(tree.segments):
        out += encode_text(tok, seg)
        if i < len(tree.children):
            forks.append(len(out))
            out.append(ids.fork)
    out.append(ids.eos)
    return out, forks


def apar_examples(tok, prompt_ids: list[int], tree: Tree, ids: Ids | None = None) -> list[Example]:
    """Root example + one example per child (recursively), each with its decoding-time context."""
    ids = ids or special_ids(tok)
    examples: list[Example] = []

    def visit(context: list[int], branch: Tree, is_child: bool) -> None:
        own, forks = branch_tokens(tok, branch, ids)
        lead = [ids.child] if is_child else []
        inputs = context + lead + own
        labels = [IGNORE] * (len(context) + len(lead)) + own
        examples.append(Example(inputs, labels))
        for child, f in zip(branch.children, forks, strict=True):
            visit(context + lead + own[: f + 1], child, True)

    visit(list(prompt_ids), tree, False)
    return examples


def sequential_tokens(tok, tree: Tree) -> list[int]:
    """The answer's text tokens in reading order, encoded segment by segment like the tree."""
    out = encode_text(tok, tree.segments[0])
    for child, seg in zip(tree.children, tree.segments[1:], strict=True):
        out += sequential_tokens(tok, child)
        out += encode_text(tok, seg)
    return out


def seq_example(
    tok, prompt_ids: list[int], tree: Tree | None, answer: str, ids: Ids | None = None
) -> Example:
    ids = ids or special_ids(tok)
    ans = sequential_tokens(tok, tree) if tree is not None else encode_text(tok, answer)
    ans = ans + [ids.eos]
    return Example(list(prompt_ids) + ans, [IGNORE] * len(prompt_ids) + ans)


def plain_example(tok, prompt_ids: list[int], answer: str, ids: Ids | None = None) -> Example:
    """An unstructured answer: identical for both models."""
    return seq_example(tok, prompt_ids, None, answer, ids)


def tree_token_counts(tok, tree: Tree) -> tuple[int, int]:
    """(steps with forking, steps sequentially) for one answer: the oracle step ratio's terms.

    A branch's token i is sampled at step start + i + 1; a child forked at parent index f
    samples its first body token in the parent's next step (its `[Child]` is fed, not sampled).
    """
    ids = special_ids(tok)

    def finish(branch: Tree, start: int) -> int:
        own, forks = branch_tokens(tok, branch, ids)
        end = start + len(own)
        for child, f in zip(branch.children, forks, strict=True):
            end = max(end, finish(child, start + f + 1))
        return end

    return finish(tree, 0), len(sequential_tokens(tok, tree)) + 1


@dataclass
class PackedTree:
    """All branches of one answer in one row: a tree attention mask instead of repeated prefixes.

    `prev[i]` is the token i sees just before itself (its parent in the tree of tokens), so
    token i attends to itself and the chain prev[i], prev[prev[i]], ...: the prompt, its
    ancestors through their `[Fork]`s, and its own branch so far, exactly as in decoding.
    `targets[i]` is the token that follows i *in its own branch* (IGNORE where none is trained).
    Mathematically the same loss and gradients as `apar_examples`, at a fraction of the tokens.
    """

    input_ids: list[int]
    position_ids: list[int]
    prev: list[int]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    def attention_mask(self, size: int | None = None):
        """Boolean [size, size] mask (True = may attend); rows past the end see only themselves."""
        import torch

        n = len(self.input_ids)
        size = size or n
        mask = torch.zeros((size, size), dtype=torch.bool)
        for i, p in enumerate(self.prev):
            if p >= 0:
                mask[i] = mask[p]
            mask[i, i] = True
        for i in range(n, size):
            mask[i, i] = True
        return mask


def pack_tree(tok, prompt_ids: list[int], tree: Tree, ids: Ids | None = None) -> PackedTree:
    ids = ids or special_ids(tok)
    inp: list[int] = []
    pos: list[int] = []
    prev: list[int] = []
    tgt: list[int] = []

    def add(token: int, position: int, before: int) -> int:
        inp.append(token)
        pos.append(position)
        prev.append(before)
        tgt.append(IGNORE)
        return len(inp) - 1

    last = -1
    for j, t in enumerate(prompt_ids):
        last = add(t, j, last)

    def visit(branch: Tree, before: int, position: int, lead: list[int]) -> None:
        """Lay out a branch whose first input follows token `before` at `position`."""
        own, forks = branch_tokens(tok, branch, ids)
        feed = lead + own[:-1]  # the final EOS is only ever a target
        seq = lead + own
        index: list[int] = []
        if not lead:  # the root: the prompt's last token predicts its first token
            tgt[before] = own[0]
        for k, t in enumerate(feed):
            before = add(t, position + k, before)
            tgt[before] = seq[k + 1]
            index.append(before)
        for child, f in zip(branch.children, forks, strict=True):
            k = f + len(lead)  # index of this [Fork] in `feed`
            visit(child, index[k], position + k + 1, [ids.child])

    visit(tree, last, len(prompt_ids), [])
    return PackedTree(inp, pos, prev, tgt)
