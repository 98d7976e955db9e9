"""Engine acceptance: HF equivalence, fork visibility, KV sharing, prefix cache, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from engine_utils import make_model, make_tokenizer

from apar_worker.engine import Engine, EngineConfig
from apar_worker.types import (
    BLOCK_SIZES,
    GenerateRequest,
    InvalidRequestError,
    ModelLoadError,
    SamplingParams,
)

FORK, CHILD = 1, 2


def reference(model):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref


def hf_greedy(ref, prompt: list[int], max_new: int) -> list[int]:
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def assert_pool_empty(engine: Engine) -> None:
    stats = engine.stats()
    assert stats.free_blocks == stats.total_blocks, stats
    assert all(c == 0 for c in engine.pool.ref_counts)


# Every model family at the smallest block size, and every allowed block size on llama.
FAMILY_BLOCKS = [(f, 4) for f in ("llama", "qwen2", "gpt2")] + [
    ("llama", bs) for bs in BLOCK_SIZES if bs != 4
]


@pytest.mark.parametrize("family,bs", FAMILY_BLOCKS)
def test_no_fork_matches_hf_generate_with_joins_and_preemption(family, bs):
    model = make_model(family)
    ref = reference(model)
    # 128 slots for ~450 tokens of demand: preemption is forced.
    engine = Engine.from_model(
        model, make_tokenizer(control_tokens=False), EngineConfig(block_size=bs, num_blocks=128 // bs)
    )
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 60, 17, 33, 9, 48, 26, 3, 40)]
    max_new = [24, 16, 30, 20, 28, 12, 24, 18, 22]
    reqs = [
        GenerateRequest(prompt_token_ids=p, sampling=SamplingParams(max_tokens=m), fork=False)
        for p, m in zip(prompts, max_new, strict=True)
    ]
    outputs = {}
    join_at = {0: reqs[:3], 2: reqs[3:6], 5: reqs[6:]}  # requests join a running batch
    step = 0
    while len(outputs) < len(reqs):
        for r in join_at.get(step, []):
            engine.add_request(r)
        for item in engine.step():
            if hasattr(item, "branches"):
                outputs[item.request_id] = item
        step += 1
    assert engine.scheduler.num_preemptions >= 1
    for r, p, m in zip(reqs, prompts, max_new, strict=True):
        out = outputs[r.request_id]
        assert len(out.branches) == 1
        assert out.branches[0].token_ids == hf_greedy(ref, p, m), f"prompt len {len(p)}"
    assert_pool_empty(engine)


def forcing_hook(force: set[tuple[int, int]], record: list):
    """Logits hook: records (branch, context, logits) and forces [Fork] at (branch, output index)."""

    def hook(rows, logits):
        for i, (_, br) in enumerate(rows):
            record.append((br.id, list(br.tokens), logits[i].clone()))
            if (br.id, len(br.output_ids)) in force:
                logits[i] = -1e9
                logits[i, FORK] = 0.0
        return logits

    return hook


@pytest.mark.parametrize("family,bs,n", [("gpt2", 16, 21)] + [("llama", bs, 22) for bs in BLOCK_SIZES])
def test_fork_branch_logits_equal_hf_on_visible_context(family, bs, n):
    model = make_model(family, seed=3)
    ref = reference(model)
    record: list = []
    # prompt of n tokens: the root's fork at output 3 is position n + 3, inside a block.
    force = {(0, 3), (0, 7), (1, 4), (2, 2)}
    engine = Engine.from_model(
        model,
        make_tokenizer(),
        EngineConfig(block_size=bs, num_blocks=1024 // bs),
        logits_hook=forcing_hook(force, record),
    )
    prompt = list(range(5, 5 + n))
    out = engine.generate(
        [GenerateRequest(prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=48, ignore_eos=True))]
    )[0]
    by_id = {b.id: b for b in out.branches}
    assert len(out.branches) == 5
    assert {b.parent for b in out.branches} == {None, 0, 1, 2}
    depth2 = [b for b in out.branches if b.parent is not None and by_id[b.parent].parent is not None]
    assert depth2, "expected a depth-2 branch"
    assert (len(prompt) + 3) % bs != 0  # the first fork lands inside a block
    worst = 0.0
    for branch_id, context, logits in record:
        if branch_id != 0:
            assert context[context.index(CHILD) - 1] == FORK
        with torch.no_grad():
            expected = ref(torch.tensor([context])).logits[0, -1]
        worst = max(worst, (expected - logits).abs().max().item())
    assert worst < 1e-4, worst
    assert out.num_tokens == 48
    assert "[Fork]" not in out.text and "[Child]" not in out.text
    assert_pool_empty(engine)


def test_fork_is_banned_after_fork_and_depth_bound_holds():
    model = make_model("llama", seed=4)
    record: list = []
    always = {(b, i) for b in range(40) for i in range(40)}  # try to fork at every step
    engine = Engine.from_model(
        model,
        make_tokenizer(),
        EngineConfig(block_size=8, num_blocks=256),
        logits_hook=forcing_hook(always, record),
    )
    req = GenerateRequest(
        prompt_token_ids=list(range(5, 15)),
        max_depth=1,
        max_branches=4,
        sampling=SamplingParams(max_tokens=40, ignore_eos=True),
    )
    out = engine.generate([req])[0]
    assert len(out.branches) == 4  # bounded by max_branches
    assert all(b.parent in (None, 0) for b in out.branches)  # bounded by max_depth
    for b in out.branches:
        toks = b.token_ids
        assert CHILD not in toks
        assert all(not (x == FORK and y == FORK) for x, y in zip(toks, toks[1:], strict=False))
    assert_pool_empty(engine)


def test_four_way_fork_shares_the_context_blocks():
    model = make_model("llama", seed=5)
    force = {(0, 0), (0, 2), (0, 4), (0, 6)}
    bs = 16
    engine = Engine.from_model(
        model,
        make_tokenizer(),
        EngineConfig(block_size=bs, num_blocks=200),
        logits_hook=forcing_hook(force, []),
    )
    prompt = (list(range(3, 253)) * 2)[:500]
    engine.add_request(
        GenerateRequest(prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=40, ignore_eos=True))
    )
    peak_with_four = 0
    while engine.has_unfinished():
        engine.step()
        state = next(iter(engine.requests.values()), None)
        if state is not None and len(state.branches) == 5:
            used = engine.pool.num_blocks - engine.pool.num_free
            peak_with_four = max(peak_with_four, used)
    one_branch = -(-(len(prompt) + 10) // bs)  # the root's context when the forks are live
    assert 0 < peak_with_four <= 1.25 * one_branch, (peak_with_four, one_branch)
    assert_pool_empty(engine)


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_blocks_return_after_cancel_max_tokens_and_preemption(bs):
    model = make_model("qwen2", seed=6)
    record: list = []
    force = {(0, 2), (0, 5)}
    engine = Engine.from_model(
        model,
        make_tokenizer(),
        # no blocks held back for forks: growth runs the pool dry and preempts at every block size
        EngineConfig(block_size=bs, num_blocks=128 // bs, expected_forks=0),
        logits_hook=forcing_hook(force, record),
    )
    long = [
        GenerateRequest(
            prompt_token_ids=list(range(10, 40)), sampling=SamplingParams(max_tokens=30, ignore_eos=True)
        )
        for _ in range(4)
    ]
    cancelled = GenerateRequest(
        prompt_token_ids=list(range(50, 70)), sampling=SamplingParams(max_tokens=100, ignore_eos=True)
    )
    for r in [*long, cancelled]:
        engine.add_request(r)
    outs = {}
    for i in range(400):
        if i == 6:
            engine.abort(cancelled.request_id)
        for item in engine.step():
            if hasattr(item, "branches"):
                outs[item.request_id] = item
        if not engine.has_unfinished():
            break
    assert outs[cancelled.request_id].finish_reason == "cancelled"
    assert all(outs[r.request_id].finish_reason == "length" for r in long)
    assert all(outs[r.request_id].num_tokens == 30 for r in long)
    assert engine.scheduler.num_preemptions >= 1
    assert sum(o.num_preemptions for o in outs.values()) >= 1
    assert_pool_empty(engine)


def test_a_preempted_forked_request_resumes_its_tree_exactly():
    """Preempted after forking, the request is recomputed with each child rejoining its parent's
    blocks (the tree's shared prefix is stored once), and ends exactly as it would have."""
    model = make_model("llama", seed=3)
    force = {(0, 3), (0, 7), (1, 4), (2, 2)}

    def forked() -> GenerateRequest:
        sampling = SamplingParams(max_tokens=48, ignore_eos=True)
        return GenerateRequest(prompt_token_ids=list(range(5, 26)), request_id="f", sampling=sampling)

    big = Engine.from_model(model, make_tokenizer(), EngineConfig(block_size=4, num_blocks=256))
    big.logits_hook = forcing_hook(force, [])
    ref = big.generate([forked()])[0]
    # 21 blocks of 4: the first request's growth preempts the forked one, which fits again only
    # if its branches share their prefix (recomputed per branch, it needed 20 blocks: rejected)
    engine = Engine.from_model(
        model,
        make_tokenizer(),
        EngineConfig(block_size=4, num_blocks=21, expected_forks=0),
        logits_hook=forcing_hook(force, []),
    )
    other = GenerateRequest(
        prompt_token_ids=list(range(100, 130)),
        fork=False,
        sampling=SamplingParams(max_tokens=40, ignore_eos=True),
    )
    out = engine.generate([other, forked()])[1]
    assert out.num_preemptions >= 1 and out.error is None and len(out.branches) == 5
    assert out.text == ref.text
    assert [b.token_ids for b in out.branches] == [b.token_ids for b in ref.branches]
    assert_pool_empty(engine)


def test_prefix_cache_reuses_full_blocks_and_gives_same_output():
    model = make_model("llama", seed=7)
    engine = Engine.from_model(
        model, make_tokenizer(control_tokens=False), EngineConfig(block_size=16, num_blocks=128)
    )
    prefix = (list(range(3, 253)) + list(range(3, 53)))[:300]
    first = engine.generate(
        [GenerateRequest(prompt_token_ids=prefix, sampling=SamplingParams(max_tokens=12))]
    )[0]
    second = engine.generate(
        [GenerateRequest(prompt_token_ids=prefix, sampling=SamplingParams(max_tokens=12))]
    )[0]
    assert first.cached_tokens == 0
    assert second.cached_tokens >= (300 // 16) * 16 - 16  # all full blocks but the one holding the last token
    assert second.cached_tokens >= 272
    assert second.branches[0].token_ids == first.branches[0].token_ids
    assert engine.stats().prefix_hit_rate > 0.4
    assert_pool_empty(engine)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt": "   "},
        {"prompt": "w1 w2", "sampling": SamplingParams(max_tokens=0)},
        {"prompt": "w1 w2", "sampling": SamplingParams(max_tokens=-3)},
        {"prompt": "w1 w2", "sampling": SamplingParams(temperature=-0.5)},
        {"prompt": "w1 w2", "sampling": SamplingParams(top_p=0.0)},
        {"prompt": "w1 w2", "sampling": SamplingParams(top_p=1.5)},
        {"prompt_token_ids": list(range(3, 200)) * 3},  # longer than the 512-token context
        {"prompt_token_ids": [3, 9999]},
    ],
)
def test_bad_input_is_a_typed_error_and_engine_keeps_serving(kwargs):
    engine = Engine.from_model(
        make_model("llama", max_len=512), make_tokenizer(), EngineConfig(num_blocks=64)
    )
    good = GenerateRequest(prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=5, ignore_eos=True))
    engine.add_request(good)
    engine.step()
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request(GenerateRequest(**kwargs))
    assert str(info.value)
    done = []
    while engine.has_unfinished():
        done += [x for x in engine.step() if hasattr(x, "branches")]
    assert [o.request_id for o in done] == [good.request_id] and done[0].num_tokens == 5
    assert_pool_empty(engine)


def test_unknown_model_path_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        Engine(EngineConfig(model=str(tmp_path / "nope")))
