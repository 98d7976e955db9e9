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

FORK = "[Fork]"
CHILD = "[Child]"
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
    if tok.convert_tokens_to_ids(FORK) == tok.unk_token_id or tok.eos_token != EOS:
        raise ValueError(f"{path} is not an APAR tokenizer (needs {FORK}, {CHILD} and {EOS})")
    return tok


def encode_text(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Plain text to ids; control-token strings inside user text are NOT turned into control ids."""
    if not text:
        return []
    return (
        list(tok.backend_tokenizer.encode(text, add_special_tokens=False).ids)
        if not _has_special(text)
        else _encode_literal(tok, text)
    )


def _has_special(text: str) -> bool:
    return any(s in text for s in SPECIAL_TOKENS)


def _encode_literal(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    # Split the special strings so the BPE sees them as ordinary characters.
    for s in SPECIAL_TOKENS:
        text = text.replace(s, s[0] + "\u200b" + s[1:])
    return list(tok.backend_tokenizer.encode(text, add_special_tokens=False).ids)


def prompt_ids(tok: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """The ids the chat template gives messages=[{"role": "user", ...}] (what the engine feeds).

    Built directly (the template is `<|user|>content<|end|><|assistant|>`) because rendering
    Jinja for every training turn is slow; a test checks both agree.
    """
    ids = tok.convert_tokens_to_ids([USER, EOS, ASSISTANT])
    return [ids[0], *encode_text(tok, prompt), ids[1], ids[2]]


def template_prompt_ids(tok: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
