"""Speculative decoding inside APAR branches (issue 15): outputs equal decoding without drafts,
token for token (greedy and seeded), with forks inside drafts; every block comes back; the
sampled distribution is the target's."""

from __future__ import annotations

import functools
import random

import pytest
import torch
from engine_utils import make_model, make_tokenizer

from apar_worker.engine import Engine, EngineConfig
from apar_worker.speculative import SpeculativeConfig, ngram_lookup
from apar_worker.step_cost import PRIOR_RATIO, StepCost
from apar_worker.types import GenerateRequest, InvalidRequestError, SamplingParams

FORK, CHILD = 1, 2
MAX_LEN = 112  # every branch ends at the model's context: a per-branch limit, the same either way
# Forced [Fork]s, by branch path (the [Fork] indices from the root down) and output index: not
# by branch id, which follows the order children are made in, and drafts change that order.
FORCED = {(): {3, 9, 15}, (3,): {4}, (9,): {2}}


def path(br) -> tuple[int, ...]:
    return tuple(br.fork_path())


def fork_hook(force: dict[tuple[int, ...], set[int]]):
    def hook(rows, logits):
        for i, (_, br) in enumerate(rows):
            if len(br.output_ids) in force.get(path(br), ()):
                logits[i] = -1e9
                logits[i, FORK] = 0.0
        return logits

    return hook


class OracleProposer:
    """Proposes each branch's reference continuation, with every `error_every`-th proposal
    wrong from a random position on; records (request, path, output length, draft)."""

    def __init__(self, reference: dict, error_every: int = 3) -> None:
        self.reference = reference
        self.error_every = error_every
        self.calls: list[tuple[str, tuple, int, list[int]]] = []
        self.rng = random.Random(0)

    def propose(self, state, br, k):
        done = len(br.output_ids)
        key = (state.request_id, path(br))
        draft = list(self.reference.get(key, [])[done : done + k])
        if draft and len(self.calls) % self.error_every == 0:
            at = self.rng.randrange(len(draft))
            draft[at] = 3 + (draft[at] + 7) % 250
        self.calls.append((*key, done, list(draft)))
        return draft


def make_engine(family: str, spec: dict | None, num_blocks: int = 256, proposer=None, force=FORCED):
    config = EngineConfig(block_size=4, num_blocks=num_blocks, speculative=spec)
    proposers = {"draft_heads": proposer} if proposer is not None else None
    model = make_model(family, seed=5, max_len=MAX_LEN)
    return Engine.from_model(
        model, make_tokenizer(), config, logits_hook=fork_hook(force), proposers=proposers
    )


def requests(n: int, max_tokens: int = 2000, **sampling) -> list[GenerateRequest]:
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 256, (5 + 7 * i,), generator=g).tolist()
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling)
        out.append(GenerateRequest(prompt_token_ids=prompt, sampling=sp, request_id=f"r{i}"))
    return out


def run(engine: Engine, reqs: list[GenerateRequest], join_every: int = 0) -> dict:
    """Requests join one per `join_every` steps (0: all at once); {id: output}."""
    outputs, pending, step = {}, list(reqs), 0
    while len(outputs) < len(reqs):
        if pending and (join_every == 0 or step % join_every == 0):
            for r in pending if join_every == 0 else pending[:1]:
                engine.add_request(r)
            pending = [] if join_every == 0 else pending[1:]
        for item in engine.step():
            if hasattr(item, "branches"):
                outputs[item.request_id] = item
        step += 1
    stats = engine.stats()
    assert stats.free_blocks == stats.total_blocks and all(c == 0 for c in engine.pool.ref_counts)
    assert not [o.error for o in outputs.values() if o.error]
    return outputs


def tokens_of(outputs: dict) -> dict[tuple[str, tuple], list[int]]:
    """(request, branch path) -> the branch's own tokens."""
    got = {}
    for rid, out in outputs.items():
        paths: dict[int, tuple] = {}
        for b in out.branches:  # parents come before their children
            paths[b.id] = () if b.parent is None else (*paths[b.parent], b.fork_position)
            got[(rid, paths[b.id])] = b.token_ids
    return got


def accepted_forks(calls, final) -> int:
    """Drafts whose kept part (the prefix equal to the final output) holds a [Fork]."""
    n = 0
    for rid, p, done, draft in calls:
        real = final[(rid, p)][done : done + len(draft)]
        kept = next((i for i, (a, b) in enumerate(zip(draft, real, strict=False)) if a != b), len(real))
        n += FORK in draft[:kept]
    return n


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("n,join_every", [(1, 0), (8, 2)])
def test_greedy_output_is_identical_with_drafts(family, n, join_every):
    reqs = requests(n)
    base = run(make_engine(family, None), reqs)
    reference = tokens_of(base)
    assert sum(len(o.branches) for o in base.values()) > n  # the forced forks happened
    oracle = OracleProposer(reference)
    engine = make_engine(
        family, {"method": "draft_heads", "num_speculative_tokens": 4, "token_budget": 64}, proposer=oracle
    )
    spec = run(engine, requests(n), join_every)
    assert tokens_of(spec) == reference
    assert {r: o.text for r, o in spec.items()} == {r: o.text for r, o in base.items()}
    assert accepted_forks(oracle.calls, reference) >= 1  # a [Fork] inside a kept draft forked
    stats = engine.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens  # some kept, the wrong ones not
    ngram = run(
        make_engine(family, {"method": "ngram", "num_speculative_tokens": 3}), requests(n), join_every
    )
    assert tokens_of(ngram) == reference


def test_speculation_saves_steps_and_reports_acceptance():
    reqs = requests(1, max_tokens=60)
    base = run(make_engine("llama", None), reqs)
    oracle = OracleProposer(tokens_of(base), error_every=10**9)  # never wrong
    engine = make_engine("llama", {"method": "draft_heads", "num_speculative_tokens": 4}, proposer=oracle)
    out = run(engine, requests(1, max_tokens=60))["r0"]
    assert out.steps * 2 < base["r0"].steps
    data = out.to_json()
    lengths = [b["acceptance_length"] for b in data["branches"] if "acceptance_length" in b]
    assert lengths and all(1.0 <= x <= 5.0 for x in lengths) and max(lengths) > 2.0


def test_limits_and_stop_strings_apply_per_accepted_token():
    spec = {"method": "draft_heads", "num_speculative_tokens": 5}
    ref = tokens_of(run(make_engine("llama", None), requests(3)))
    # stop strings and the model's context end one branch: the same token either way
    stop = make_tokenizer().decode([ref[("r1", ())][12]])  # a word r1's root says mid-answer
    outs = []
    for s in (None, spec):
        reqs = requests(3)
        for r in reqs:
            r.sampling.stop = [stop]
        outs.append(run(make_engine("llama", s, proposer=OracleProposer(ref)), reqs))
    assert tokens_of(outs[0]) == tokens_of(outs[1])
    assert {k: v.text for k, v in outs[0].items()} == {k: v.text for k, v in outs[1].items()}
    assert outs[1]["r1"].branches[0].finish_reason == "stop"
    # one branch: max_tokens ends it at the same token
    single = []
    for s in (None, spec):
        reqs = requests(3, max_tokens=23)
        for r in reqs:
            r.fork = False
        single.append(tokens_of(run(make_engine("llama", s, proposer=OracleProposer(ref)), reqs)))
    assert single[0] == single[1] and all(len(t) == 23 for t in single[1].values())
    # shared limits: spent per kept token (which branch got the last ones may differ, since
    # drafts let a branch run ahead of its siblings), never exceeded, each branch a prefix
    reqs = requests(3, max_tokens=31)
    for r in reqs:
        r.max_branches = 2
    out = run(make_engine("llama", spec, proposer=OracleProposer(ref)), reqs)
    assert all(o.num_tokens == 31 and len(o.branches) <= 2 for o in out.values())
    for key, toks in tokens_of(out).items():
        assert ref[key][: len(toks)] == toks, key


def test_child_is_never_drafted_and_preemption_cancel_free_every_block():
    class ChildProposer:
        def propose(self, state, br, k):
            return [CHILD, 5, 6][:k]

    engine = make_engine("llama", {"method": "draft_heads"}, proposer=ChildProposer())
    base = run(make_engine("llama", None), requests(2))
    assert tokens_of(run(engine, requests(2))) == tokens_of(base)
    assert engine.stats().spec_draft_tokens == 0
    # A pool too small for 8 forking requests: preemption with drafts in flight.
    small = run(make_engine("llama", None, num_blocks=200), requests(8))
    oracle = OracleProposer(tokens_of(small))
    engine = make_engine(
        "llama", {"method": "draft_heads", "num_speculative_tokens": 4}, num_blocks=200, proposer=oracle
    )
    out = run(engine, requests(8), join_every=1)
    assert engine.scheduler.num_preemptions >= 1
    assert tokens_of(out) == tokens_of(small)
    # Cancel mid-answer with drafts in flight.
    engine = make_engine("llama", {"method": "ngram"})
    for r in requests(4, max_tokens=200):
        engine.add_request(r)
    for _ in range(12):
        engine.step()
    for rid in list(engine.requests):
        engine.abort(rid)
    engine.step()
    assert engine.kv.num_free == engine.kv.num_blocks and not engine.requests


def test_seeded_sampling_is_identical_and_matches_the_target_distribution():
    # seeded: the same draws in the same order with or without drafts
    sampling = dict(temperature=1.0, top_k=8, seed=11)
    base = run(make_engine("llama", None), requests(3, **sampling))
    ngram = run(
        make_engine("llama", {"method": "ngram", "num_speculative_tokens": 4}), requests(3, **sampling)
    )
    oracle = OracleProposer(tokens_of(base))
    spec_engine = make_engine("llama", {"method": "draft_heads"}, proposer=oracle)
    spec = run(spec_engine, requests(3, **sampling))
    assert tokens_of(ngram) == tokens_of(base) == tokens_of(spec)
    assert spec_engine.stats().spec_accepted_tokens > 0


def test_accepted_token_distribution_matches_the_target():
    """Unseeded-like (one seed per request) samples of (t1, t2, t3) with drafts proposed for
    t2, t3 follow the model's own distribution (chi-square over the top-3 support)."""
    model = make_model("llama", seed=9)
    prompt = [17, 40, 99, 5]
    sp = dict(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)

    @functools.cache
    def cached(ctx: tuple[int, ...]) -> dict[int, float]:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(ctx)])).logits[0, -1]
        top = torch.topk(logits, 3)
        return dict(zip(top.indices.tolist(), torch.softmax(top.values, -1).tolist(), strict=True))

    def probs(ctx: list[int]) -> dict[int, float]:
        return cached(tuple(ctx))

    exact = {}
    for a, pa in probs([]).items():
        for b, pb in probs([a]).items():
            for c, pc in probs([a, b]).items():
                exact[(a, b, c)] = pa * pb * pc

    class Greedy:  # proposes the most likely t2, t3: accepted about as often as they are likely
        def propose(self, state, br, k):
            ctx = br.output_ids
            if len(ctx) != 1:
                return []
            b = max(probs(ctx).items(), key=lambda x: x[1])[0]
            c = max(probs(ctx + [b]).items(), key=lambda x: x[1])[0]
            return [b, c][:k]

    config = EngineConfig(
        block_size=4,
        num_blocks=512,
        max_num_seqs=256,
        speculative={"method": "draft_heads", "token_budget": 1024},
    )
    engine = Engine.from_model(model, make_tokenizer(), config, proposers={"draft_heads": Greedy()})
    n = 3000
    reqs = [
        GenerateRequest(prompt_token_ids=prompt, sampling=SamplingParams(seed=i, **sp), fork=False)
        for i in range(n)
    ]
    outs = engine.generate(reqs)
    stats = engine.stats()
    assert stats.spec_draft_tokens > n and 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens
    counts: dict[tuple[int, ...], int] = {}
    for o in outs:
        key = tuple(o.branches[0].token_ids)
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(exact)
    chi2 = sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in exact.items())
    assert chi2 < 54.05, chi2  # chi-square, 26 degrees of freedom, p = 0.001


def test_ngram_lookup_and_config_errors():
    assert ngram_lookup([1, 2, 3, 9, 8, 1, 2, 3], 3, 2, 4) == [9, 8, 1]
    assert ngram_lookup([5, 6, 7, 8], 3, 2, 4) == []
    assert ngram_lookup([4, 1, 2, 7, 1, 2], 2, 2, 3) == [7, 1]  # the shorter suffix matched
    assert (
        SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 2}').num_speculative_tokens
        == 2
    )
    assert SpeculativeConfig.parse(None) is None and SpeculativeConfig.parse("off") is None
    for bad in ('{"method": "medusa"}', '{"num_speculative_tokens": 0}', '{"k": 3}', "{not json", "[1]"):
        with pytest.raises(InvalidRequestError):
            SpeculativeConfig.parse(bad)
    with pytest.raises(InvalidRequestError):
        GenerateRequest(prompt="hi", speculative="eagle").validate()


def test_step_cost_model_learns_what_a_token_costs():
    cost = StepCost()
    assert cost.coefficients() == (1.0, PRIOR_RATIO)  # nothing seen: the prior
    for t in (1, 2, 4, 8, 16, 32, 64, 3, 5, 9):
        cost.add(t, 0.040 + 0.010 * t)  # a CPU-like step: 40 ms + 10 ms a token
    c0, c1 = cost.coefficients()
    assert c0 == pytest.approx(0.040) and c1 == pytest.approx(0.010)
    # one branch alone: a draft kept 1 time in 5 pays; 16 branches need nearly sure drafts
    assert cost.threshold(1, 1) == pytest.approx(0.2)
    assert cost.threshold(16, 16) == pytest.approx(0.8)
    gpu = StepCost()
    for t in (1, 8, 64, 256, 2, 16, 32, 128):
        gpu.add(t, 0.020)  # the batch is free
    assert gpu.threshold(64, 64) == pytest.approx(0.0)
