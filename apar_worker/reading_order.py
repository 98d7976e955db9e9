"""Per-branch events -> text deltas of the assembled answer, in reading order, once final.

The answer reads: the root's text up to its first fork, that child's whole answer, the root's
text up to its next fork, and so on (docs/design.md, "Decoding contract"). A reader can show
the root's text at once and the first child's as it is written; text of later branches waits
in a buffer until every part before it has ended. Nothing is ever re-ordered or repeated, so
the concatenated deltas equal the final assembled text.

A child is placed where its parent's text stood when the child was created: the engine emits
a fork's creation event right after the parent's event of the step that sampled `[Fork]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from apar_worker.types import BranchEvent


@dataclass(eq=False)
class _Node:
    parts: list[str | _Node] = field(default_factory=list)
    finished: bool = False

    def add_text(self, text: str) -> None:
        if not text:
            return
        if self.parts and isinstance(self.parts[-1], str):
            self.parts[-1] += text
        else:
            self.parts.append(text)


class ReadingOrder:
    """Feed every BranchEvent of one request (stream=True, so deltas are filled) in order."""

    def __init__(self) -> None:
        self.nodes: dict[int, _Node] = {}
        self._stack: list[list] = []  # [node, part index, chars of that part already emitted]
        self.emitted = ""

    def feed(self, event: BranchEvent) -> str:
        """The text that became final with this event ("" if it is still buffered)."""
        node = self.nodes.get(event.branch_id)
        if node is None:
            node = self.nodes[event.branch_id] = _Node()
            parent = self.nodes.get(event.parent_id) if event.parent_id is not None else None
            if parent is not None:
                parent.parts.append(node)
            elif not self._stack:
                self._stack.append([node, 0, 0])  # the root
        node.add_text(event.delta_text)
        if event.finish_reason is not None:
            node.finished = True
        out = self._drain()
        self.emitted += out
        return out

    def finish(self, final_text: str | None = None) -> str:
        """At the end of the request every branch has ended: flush whatever is left.

        Given the request's final text, the flush is whatever of it was not sent yet (a stop
        string may cut a branch's buffered text), so the deltas always add up to it when what
        was already sent is a prefix of it.
        """
        for node in self.nodes.values():
            node.finished = True
        sent = self.emitted
        out = self._drain()
        if final_text is not None and final_text.startswith(sent):
            out = final_text[len(sent) :]
        self.emitted = sent + out
        return out

    def _drain(self) -> str:
        out: list[str] = []
        while self._stack:
            top = self._stack[-1]
            node, i, done = top
            if i >= len(node.parts):
                if not node.finished:
                    break
                self._stack.pop()
                continue
            part = node.parts[i]
            if isinstance(part, _Node):
                top[1], top[2] = i + 1, 0
                self._stack.append([part, 0, 0])
                continue
            out.append(part[done:])
            if i + 1 < len(node.parts):
                top[1], top[2] = i + 1, 0
                continue
            top[2] = len(part)
            if not node.finished:
                break
            self._stack.pop()
        return "".join(out)
