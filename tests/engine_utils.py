"""Tiny random-weight HF models and a word-level tokenizer for engine tests (no downloads)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 256
SPECIALS = ["<eos>", "[Fork]", "[Child]"]


def make_tokenizer(control_tokens: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer `w0 w1 ...`; ids 1 and 2 are [Fork]/[Child] (plain words without them)."""
    specials = SPECIALS if control_tokens else ["<eos>", "x1", "x2"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(VOCAB - len(SPECIALS)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    if control_tokens:
        fast.add_special_tokens({"additional_special_tokens": ["[Fork]", "[Child]"]})
    return fast


def make_model(family: str, seed: int = 0, max_len: int = 1024):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, eos_token_id=0, bos_token_id=None, pad_token_id=0)
    decoder = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_len,
        **common,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**decoder))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**decoder))
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=max_len, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    # Larger random weights spread the logits, so greedy argmax has no near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval()


def assert_greedy_is_hf_generate(engine, seed: int = 4, prompt_len: int = 11, max_tokens: int = 12) -> None:
    """The engine's greedy output on one random prompt is transformers' greedy generate on the
    engine's own (quantized, packed) model, and every KV block is back afterwards."""
    from apar_worker.types import GenerateRequest, SamplingParams

    model = engine.runner.model
    prompt = torch.randint(3, VOCAB, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    req = GenerateRequest(prompt_token_ids=prompt, fork=False, sampling=SamplingParams(max_tokens=max_tokens))
    got = list(engine.generate([req])[0].branches[0].token_ids)
    model.set_attn_implementation("eager")
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    assert got == hf[0, len(prompt) :].tolist()
    stats = engine.stats()
    assert stats.free_blocks == stats.total_blocks
