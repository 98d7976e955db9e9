"""Byte-level BPE tokenizer with the APAR control tokens and a chat template.

Saved in the Hugging Face format (tokenizer.json + tokenizer_config.json + special tokens
map) so `AutoTokenizer.from_pretrained(dir)` loads it offline and `apply_chat_template`
renders prompts exactly as training did.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from apar_worker.chat import neutralize
from apar_worker.types import CHILD_TOKEN as CHILD
from apar_worker.types import FORK_TOKEN as FORK

EOS = "<|end|>"
PAD = "<|pad|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SYSTEM = "<|system|>"
SPECIAL_TOKENS = [PAD, EOS, FORK, CHILD, USER, ASSISTANT, SYSTEM]

# Every turn is `<|role|>content<|end|>`; the assistant's answer ends with the same EOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{% elif m['role'] == 'assistant' %}<|assistant|>"
    "{% else %}<|system|>{% endif %}{{ m['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; special tokens get the first ids and are never split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[FORK, CHILD, USER, ASSISTANT, SYSTEM],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tok: PreTrainedTokenizerFast, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    vocab = tok.get_vocab()
    if FORK not in vocab or CHILD not in vocab or tok.eos_token is None:
        raise ValueError(f"{path} is not an APAR tokenizer (needs {FORK}, {CHILD} and an EOS token)")
    return tok


def add_apar_tokens(tok) -> int:
    """Give a pretrained tokenizer `[Fork]` and `[Child]` as special (never split) tokens.

    They take the next free ids after the base vocabulary, so the base's own ids are unchanged
    and the model only grows by two embedding rows. Returns how many were new.
    """
    vocab = tok.get_vocab()
    missing = [t for t in (FORK, CHILD) if t not in vocab]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    return len(missing)


def encode_text(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Plain text to ids; control-token strings inside user text are NOT turned into control ids."""
    if not text:
        return []
    return list(tok.backend_tokenizer.encode(neutralize(tok, text), add_special_tokens=False).ids)


_SENTINEL = "\x00APAR-PROMPT\x00"


def template_parts(tok) -> tuple[list[int], list[int]]:
    """The ids the chat template puts before and after one user message's content.

    Rendered once with a sentinel as the content; the template's own markers are parsed as
    special tokens, the content never is (see `encode_text`).
    """
    cached = getattr(tok, "_apar_template_parts", None)
    if cached is None:
        text = tok.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], add_generation_prompt=True, tokenize=False
        )
        before, sep, after = text.partition(_SENTINEL)
        if not sep:
            raise ValueError("the chat template does not include the message content")
        enc = tok.backend_tokenizer.encode
        cached = (
            list(enc(before, add_special_tokens=False).ids),
            list(enc(after, add_special_tokens=False).ids),
        )
        tok._apar_template_parts = cached
    return cached


def prompt_ids(tok: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """The ids the chat template gives messages=[{"role": "user", ...}] (what the engine feeds).

    Built from the template's cached parts because rendering Jinja for every training turn is
    slow; a test checks both agree.
    """
    before, after = template_parts(tok)
    return [*before, *encode_text(tok, prompt), *after]


def template_prompt_ids(tok: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
