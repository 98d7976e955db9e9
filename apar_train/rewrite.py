"""Rewrite structured answers into the APAR fork format (docs/design.md, "Training data") and assemble them back.

A `Tree` is a branch: its text is `segments` with one `[Fork]` between consecutive segments,
and `children[i]` is the branch forked at the i-th `[Fork]`. Reading order (the engine's
contract, docs/design.md "Decoding contract") is segments[0], children[0], segments[1], children[1], ..., segments[-1].
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from apar_worker.types import FORK_TOKEN as FORK

_ITEM_START = re.compile(r"^(\d{1,2})\. ", re.MULTILINE)
_ANY_NUMBERED = re.compile(r"^\s*\d{1,3}[.)] ", re.MULTILINE)
_ITEM = re.compile(r"(\d{1,2})\. ([^:\n]{2,80}):( .*)", re.DOTALL)
_SENTENCE_ITEM = re.compile(r"(\d{1,2})\. ([^\n]{10,200}?[.!?])( .*)", re.DOTALL)
_FIRST_SENTENCE = re.compile(r"(.{15,240}?[.!?])(\s.*)", re.DOTALL)
_CODE_MATH_TABLE_LINK = [
    re.compile(r"```|`[^`\n]+`"),  # code blocks and inline code
    re.compile(r"^\s*(def |class |import |#include|function |public |SELECT |<\w+[ >])", re.MULTILINE),
    re.compile(r"^\s*\|.*\|\s*$", re.MULTILINE),  # table rows
    re.compile(r"https?://|www\.", re.IGNORECASE),  # links
    re.compile(r"\$[^$\n]+\$|\\\(|\\\[|\\frac|\\sum|\d\s*[=^*/]\s*\d|[a-z]\s*=\s*\d"),  # math
]


@dataclass
class Tree:
    """One branch of an answer: text pieces around its forks, and the forked children."""

    segments: list[str]
    children: list[Tree] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.segments) != len(self.children) + 1:
            raise ValueError("a tree needs exactly one more segment than children")

    @property
    def num_branches(self) -> int:
        return 1 + sum(c.num_branches for c in self.children)


def assemble(tree: Tree) -> str:
    """The answer in reading order, control tokens dropped (the engine's assembly rule)."""
    out = [tree.segments[0]]
    for child, seg in zip(tree.children, tree.segments[1:], strict=True):
        out.append(assemble(child))
        out.append(seg)
    return "".join(out)


def branch_text(tree: Tree) -> str:
    """A branch's own text with its `[Fork]` markers, as the model writes it."""
    return FORK.join(tree.segments)


def normalize_ws(text: str) -> str:
    return " ".join(text.split())


def has_code_math_table_link(text: str) -> bool:
    return any(p.search(text) for p in _CODE_MATH_TABLE_LINK)


def has_numbered_list(text: str) -> bool:
    return _ANY_NUMBERED.search(text) is not None


def _tree_from_bodies(text: str, bodies: list[tuple[int, int]]) -> Tree:
    """Cut `text` at each body span: the body becomes a child forked at the span's start."""
    segments, children, pos = [], [], 0
    for start, end in bodies:
        segments.append(text[pos:start])
        children.append(Tree([text[start:end]]))
        pos = end
    segments.append(text[pos:])
    return Tree(segments, children)


def _item_runs(text: str) -> list[list[re.Match[str]]]:
    """Group item starts (`N. ` at line start) into runs numbered 1, 2, 3, ..."""
    runs: list[list[re.Match[str]]] = []
    for m in _ITEM_START.finditer(text):
        n = int(m.group(1))
        if runs and int(runs[-1][-1].group(1)) == n - 1:
            runs[-1].append(m)
        else:
            runs.append([m])
    return runs


def rewrite_list(
    text: str,
    min_items: int = 3,
    min_body_chars: int = 40,
    max_title_words: int = 12,
    sentence_items: bool = True,
) -> Tree | None:
    """Fork after each `N. Title:` of every ordered list; None when the answer does not qualify.

    Every numbered list of the answer must qualify (>= min_items items, each `N. Title: body`
    with a short title and a body of some length), so the model never sees a list that could
    have forked and did not. With `sentence_items`, an item without a title may fork after its
    first sentence instead (`N. Do this. Because ...`), as the paragraph rule does.
    """
    if has_code_math_table_link(text):
        return None
    runs = _item_runs(text)
    if not runs or len(_ANY_NUMBERED.findall(text)) != sum(len(r) for r in runs):
        return None
    bodies: list[tuple[int, int]] = []
    for run in runs:
        if len(run) < min_items or int(run[0].group(1)) != 1:
            return None
        for i, m in enumerate(run):
            if i + 1 < len(run):
                end = run[i + 1].start()
            else:
                blank = text.find("\n\n", m.start())
                end = len(text) if blank < 0 else blank
            item = text[m.start() : end].rstrip()
            im = _ITEM.fullmatch(item)
            if im is not None and len(im.group(2).split()) > max_title_words:
                im = None
            if im is None and sentence_items:
                im = _SENTENCE_ITEM.fullmatch(item)
            if im is None:
                return None
            body = im.group(3)
            if len(body.strip()) < min_body_chars:
                return None
            start = m.start() + im.start(3)
            bodies.append((start, start + len(body)))
    return _tree_from_bodies(text, bodies)


def rewrite_paragraphs(text: str, min_paragraphs: int = 3, min_body_chars: int = 60) -> Tree | None:
    """Fork after the first sentence of each paragraph with a body; None unless >= min_paragraphs."""
    if has_code_math_table_link(text) or has_numbered_list(text):
        return None
    bodies: list[tuple[int, int]] = []
    pos = 0
    for para in text.split("\n\n"):
        start = pos
        pos += len(para) + 2
        if para.lstrip().startswith(("-", "*", "•", "#")) or "\n" in para.strip():
            if para.strip():
                return None  # bullets, headings or hard-wrapped text: not plain paragraphs
            continue
        m = _FIRST_SENTENCE.fullmatch(para.rstrip())
        if m and len(m.group(2).strip()) >= min_body_chars:
            bodies.append((start + m.start(2), start + m.end(2)))
    if len(bodies) < min_paragraphs:
        return None
    return _tree_from_bodies(text, bodies)
