"""Draft heads (Medusa-style proposer, issue 15): what they guess, how they are stored, how
they are fitted on a model's own answers, and that decoding with them changes nothing."""

from __future__ import annotations

import pytest
import torch
from engine_utils import make_model, make_tokenizer

from apar_train.draft_heads import HeadsConfig, Recorder, accuracy, draft_vocab, fit, in_vocab
from apar_worker.draft_heads import HEADS_FILE, DraftHeads, DraftHeadsProposer, find_heads, output_matrix
from apar_worker.engine import Engine, EngineConfig
from apar_worker.model_registry import resolve_model
from apar_worker.sequence import Branch
from apar_worker.types import GenerateRequest, InvalidRequestError, ModelLoadError, SamplingParams


def test_zero_heads_guess_the_next_token_and_survive_a_round_trip(tmp_path):
    model = make_model("llama", seed=1)
    weight = output_matrix(model)
    heads = DraftHeads(64, 3, torch.arange(weight.shape[0]))
    hidden = torch.randn(5, 64)
    nxt = (hidden @ weight.T).argmax(-1)
    assert torch.equal(heads.guess(hidden, weight), nxt[:, None].expand(5, 3))  # identity at init
    with torch.no_grad():
        for blk in heads.blocks:
            blk.weight.normal_(0, 0.3)
    path = tmp_path / HEADS_FILE
    heads.half().save(path, {"model": "tiny"})
    back = DraftHeads.load(path)
    assert back.num_heads == 3 and torch.equal(back.vocab, heads.vocab)
    assert torch.equal(back.guess(hidden, weight), heads.float().guess(hidden, weight))
    assert find_heads(tmp_path, None) == path and find_heads(tmp_path / "none", None) is None
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ModelLoadError):
        DraftHeads.load(tmp_path / "bad.safetensors")
    with pytest.raises(ModelLoadError):
        find_heads(None, str(tmp_path / "missing.safetensors"))


def _requests(prompts, speculative=None):
    return [
        GenerateRequest(
            prompt_token_ids=p,
            sampling=SamplingParams(max_tokens=60, ignore_eos=True),
            request_id=f"r{i}",
            speculative=speculative,
        )
        for i, p in enumerate(prompts)
    ]


def test_heads_fitted_on_own_answers_draft_and_change_nothing():
    model = make_model("llama", seed=2)
    tok = make_tokenizer(control_tokens=False)  # plain decoding: no forks in this one
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (6 + 3 * i,), generator=g).tolist() for i in range(6)]
    recorder = Recorder()
    config = EngineConfig(block_size=4, num_blocks=512)
    engine = Engine.from_model(model, tok, config, proposers={"draft_heads": recorder})
    base = engine.generate(_requests(prompts, "draft_heads"))  # records, proposes nothing
    assert engine.stats().spec_draft_tokens == 0
    hidden, targets = recorder.examples(3)
    assert len(hidden) == sum(o.num_tokens for o in base) - len(base)  # every token but the last
    weight = output_matrix(model)
    heads = DraftHeads(64, 3, draft_vocab(targets, 200, []))
    cfg = HeadsConfig(epochs=30, batch_size=64, lr=1e-2)
    fit(heads, hidden, targets, recorder.groups(), weight, cfg, progress=False)
    acc = accuracy(heads, hidden, in_vocab(targets, heads.vocab, weight.shape[0]), weight[heads.vocab])
    assert acc[0] > 0.5  # they learnt the answers they were fitted on
    spec = Engine.from_model(
        model,
        tok,
        EngineConfig(block_size=4, num_blocks=512, speculative={"method": "draft_heads"}),
        proposers={"draft_heads": DraftHeadsProposer(heads, model)},
    )
    assert spec.runner.keep_hidden
    out = spec.generate(_requests(prompts))
    assert [o.branches[0].token_ids for o in out] == [o.branches[0].token_ids for o in base]
    stats = spec.stats()
    assert stats.spec_accepted_tokens > 0 and stats.free_blocks == stats.total_blocks
    assert sum(o.steps for o in out) < sum(o.steps for o in base)


def test_a_request_may_only_ask_for_a_proposer_the_engine_has():
    engine = Engine.from_model(
        make_model("llama"), make_tokenizer(), EngineConfig(block_size=4, num_blocks=64)
    )
    with pytest.raises(InvalidRequestError, match="draft_heads"):
        engine.add_request(_requests([[5, 6, 7]], "draft_heads")[0])
    with pytest.raises(InvalidRequestError, match="no draft heads"):
        Engine.from_model(
            make_model("llama"),
            make_tokenizer(),
            EngineConfig(block_size=4, num_blocks=64, speculative={"method": "draft_heads"}),
        )


def test_shipped_model_heads_load_and_keep_the_answer():
    path = find_heads(resolve_model("apar-smol"), None)
    assert path is not None, "apar-smol ships draft heads"
    engine = Engine(EngineConfig(model="apar-smol", device="cpu", kv_cache_memory_mb=32))
    msg = [{"role": "user", "content": "List three ways to save water at home."}]
    reqs = [
        GenerateRequest(
            messages=msg, sampling=SamplingParams(max_tokens=480), speculative=s, request_id=f"{s}"
        )
        for s in ("off", "draft_heads")
    ]
    off = engine.generate(reqs[:1])[0]
    on = engine.generate(reqs[1:])[0]
    assert on.text == off.text and len(on.branches) == len(off.branches) > 1
    assert sum(b.spec_accepted for b in on.branches) > 0
    assert on.steps < off.steps


def test_heads_give_way_to_a_prompt_lookup_match_and_draft_only_confident_guesses():
    """With `lookup`, a repeated context proposes what followed it; elsewhere the heads' guesses,
    as long as they are confident (a uniform guess drafts nothing)."""
    model = make_model("llama", seed=2)
    heads = DraftHeads(64, 3, torch.arange(50, 60))  # zero-initialised: each head guesses the next token
    proposer = DraftHeadsProposer(heads, model, lookup=(2, 4))
    plain = DraftHeadsProposer(heads, model)
    sure = output_matrix(model)[55][None] * 50  # a state whose next token is clearly 55
    state = None
    br = Branch(id=0, parent=None, depth=0, tokens=[7, 8, 9, 10, 11, 7, 8], own_start=0)
    fresh = Branch(id=1, parent=None, depth=0, tokens=[1, 2, 3, 4], own_start=0)  # nothing repeats
    for p in (proposer, plain):
        p.observe([(state, br), (state, fresh)], sure.expand(2, 64))
    assert proposer.propose(state, br, 3) == [9, 10, 11]  # what followed "7 8" before
    assert plain.propose(state, br, 3) == [55, 55, 55]  # the heads' own guesses
    assert proposer.propose(state, fresh, 2) == plain.propose(state, fresh, 2) == [55, 55]
    plain.observe([(state, fresh)], torch.zeros(1, 64))  # every draft token equally likely
    assert plain.propose(state, fresh, 3) == []
