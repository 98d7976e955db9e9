"""User text into token ids without ever producing a special token.

A tokenizer matches its special strings (`<|im_end|>`, `[Fork]`, ...) anywhere in the text it
encodes, so a user who types one would fake a turn or force a fork. Every special string in
user text gets a zero-width space after its first character: it then encodes (and decodes)
as ordinary characters, while the chat template's own markers stay special.
"""

from __future__ import annotations

from apar_worker.types import CONTROL_TOKENS, GenerateRequest, InvalidRequestError

ZWSP = "\u200b"


def special_strings(tok) -> list[str]:
    """Every string the tokenizer turns into a special id, longest first (cached on it)."""
    cached = getattr(tok, "_apar_specials", None)
    if cached is None:
        specials = set(CONTROL_TOKENS)
        specials.update(str(t) for t in getattr(tok, "all_special_tokens", []))
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            specials.update(t.content for t in backend.get_added_tokens_decoder().values())
        cached = sorted((s for s in specials if len(s) > 1), key=len, reverse=True)
        tok._apar_specials = cached
    return cached


def neutralize(tok, text: str) -> str:
    """`text` with every special string broken by a zero-width space (unchanged otherwise)."""
    for s in special_strings(tok):
        if s in text:
            text = text.replace(s, s[0] + ZWSP + s[1:])
    return text


def neutralize_messages(tok, messages: list[dict]) -> list[dict]:
    return [{**m, "content": neutralize(tok, str(m.get("content", "")))} for m in messages]


def encode_request(tok, req: GenerateRequest, vocab_size: int) -> list[int]:
    """A request's prompt ids: given ids (range-checked), chat messages, or a raw prompt."""
    if req.prompt_token_ids is not None:
        ids = list(req.prompt_token_ids)
        if any(not isinstance(t, int) or t < 0 or t >= vocab_size for t in ids):
            raise InvalidRequestError(f"prompt_token_ids must be integers in [0, {vocab_size})")
        return ids
    if req.messages is not None:
        if not getattr(tok, "chat_template", None):
            raise InvalidRequestError("this model has no chat template: send a raw prompt instead")
        rendered = tok.apply_chat_template(
            neutralize_messages(tok, req.messages), add_generation_prompt=True, tokenize=False
        )
        return tok.encode(rendered, add_special_tokens=False)
    return tok.encode(neutralize(tok, req.prompt))
