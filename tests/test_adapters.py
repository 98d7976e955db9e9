"""LoRA adapters: training form vs merged form, export and assembly onto a base (tiny models)."""

from __future__ import annotations

import json

import pytest
import torch
from engine_utils import make_model, make_tokenizer

from apar_train.tokenizer import CHILD, FORK, add_apar_tokens
from apar_worker.adapters import (
    AdapterConfig,
    LoRALinear,
    adapter_state,
    apply_lora,
    load_adapter,
    load_adapter_state,
    merge_into,
    save_adapter,
    train_new_rows,
)
from apar_worker.model_registry import assemble, build_assembly, resolve_model


def base_pair(tmp_path):
    """A tiny random Llama base without control tokens, saved as an HF directory."""
    tok = make_tokenizer(control_tokens=False)
    model = make_model("llama").eval()
    d = tmp_path / "base"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, tok


def lora_model(base_dir, tok, seed: int = 1):
    """The base + [Fork]/[Child] rows + LoRA with random (non-zero) factors, as after training."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_vocab = model.get_input_embeddings().weight.shape[0]
    assert add_apar_tokens(tok) == 2
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    cfg = AdapterConfig(base=str(base_dir), r=4, alpha=8, base_vocab_size=base_vocab, vocab_size=len(tok))
    wrapped = apply_lora(model, cfg)
    train_new_rows(model, base_vocab)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05, generator=g)
        model.get_input_embeddings().weight[base_vocab:].normal_(0, 0.2, generator=g)
    return model.eval(), cfg, wrapped


def test_lora_starts_as_the_base_and_trains_only_its_own_tensors(tmp_path):
    base_dir, tok = base_pair(tmp_path)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    n = model.get_input_embeddings().weight.shape[0]
    cfg = AdapterConfig(base="x", r=4, alpha=8, base_vocab_size=n, vocab_size=n + 2)
    add_apar_tokens(tok)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    wrapped = apply_lora(model, cfg)
    assert len(wrapped) == 2 * 7  # every attention and MLP projection of both layers
    rows = train_new_rows(model, n)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():  # B == 0: exactly the base on base tokens
        torch.testing.assert_close(model(ids).logits[..., :n], base(ids).logits, rtol=0, atol=1e-6)
    model(torch.tensor([[3, n, n + 1, 4]])).logits.sum().backward()
    for w in rows:
        assert w.grad is not None and w.grad[:n].abs().sum() == 0 and w.grad[n:].abs().sum() > 0
    frozen = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]
    assert sorted(frozen) == ["lm_head.weight", "model.embed_tokens.weight"]  # untied head: both


def test_merged_model_has_the_adapter_models_logits(tmp_path):
    base_dir, tok = base_pair(tmp_path)
    model, cfg, _ = lora_model(base_dir, tok)
    state = adapter_state(model, cfg)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    merge_into(merged, state, cfg)
    ids = torch.tensor([[3, 9, cfg.base_vocab_size, 11, cfg.base_vocab_size + 1, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_export_and_assembly_roundtrip(tmp_path, monkeypatch):
    """Saved fp16 adapter + tokenizer -> assembled checkpoint equal to the adapter model (fp16 factors)."""
    monkeypatch.setenv("APAR_HOME", str(tmp_path / "home"))
    base_dir, tok = base_pair(tmp_path)
    model, cfg, _ = lora_model(base_dir, tok)
    shipped = tmp_path / "apar-test"
    save_adapter(shipped, adapter_state(model, cfg), cfg)
    tok.save_pretrained(shipped)
    # the unmerged model with the factors as stored (fp16) is what the assembly must equal
    cfg2, stored = load_adapter(shipped)
    assert cfg2 == cfg and (shipped / "adapter.safetensors").stat().st_size < 200_000
    load_adapter_state(model, {k: v.float() for k, v in stored.items()}, cfg)
    out = assemble(shipped, progress=False)
    assert out.parent == tmp_path / "home" / "models" and resolve_model(str(shipped)) == out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    fork, child = tok2.convert_tokens_to_ids([FORK, CHILD])
    assert (fork, child) == (cfg.base_vocab_size, cfg.base_vocab_size + 1)
    ids = torch.tensor([[3, 9, fork, child, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    info = json.loads((out / "apar_assembled.json").read_text())
    assert info["base"] == str(base_dir)


def test_assembly_rejects_a_tokenizer_that_does_not_fit(tmp_path):
    base_dir, tok = base_pair(tmp_path)
    model, cfg, _ = lora_model(base_dir, tok)
    shipped = tmp_path / "bad"
    save_adapter(shipped, adapter_state(model, cfg), cfg)
    make_tokenizer(control_tokens=False).save_pretrained(shipped)  # lacks the two new tokens
    with pytest.raises(Exception, match="tokenizer has"):
        build_assembly(shipped, base_dir, tmp_path / "out")
