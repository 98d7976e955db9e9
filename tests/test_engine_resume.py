"""Resume, not replay: a request continued on a fresh engine from its branch tree so far."""

from __future__ import annotations

import pytest
from engine_utils import make_model, make_tokenizer
from test_engine import assert_pool_empty, forcing_hook

from apar_worker.engine import Engine, EngineConfig
from apar_worker.resume import resumed_tree
from apar_worker.types import BranchEvent, GenerateRequest, InvalidRequestError, RequestOutput, SamplingParams

FORCE = {(0, 3), (0, 7), (1, 4), (2, 2)}  # forks at fixed output lengths: the same tree every run
PROMPT = list(range(5, 26))


def _engine(model, block_size: int = 16) -> Engine:
    return Engine.from_model(
        model, make_tokenizer(), EngineConfig(block_size=block_size, num_blocks=128),
        logits_hook=forcing_hook(FORCE, []),
    )  # fmt: skip


def _request(**kw) -> GenerateRequest:
    return GenerateRequest(
        prompt_token_ids=PROMPT,
        request_id="r1",
        sampling=SamplingParams(max_tokens=48, ignore_eos=True),
        **kw,
    )


@pytest.mark.parametrize("cut", [2, 20, 36])
def test_resumed_request_ends_as_if_never_interrupted(cut):
    model = make_model("llama", seed=3)
    full = _engine(model).generate([_request(stream=True)])[0]
    assert len(full.branches) == 5

    first = _engine(model)
    first.add_request(_request(stream=True))
    sent: dict[int, list[int]] = {}
    while first.requests["r1"].num_generated < cut:
        for ev in first.step():
            if isinstance(ev, BranchEvent):
                sent.setdefault(ev.branch_id, []).extend(ev.new_token_ids)
    tree = resumed_tree(first.requests["r1"].branches)
    assert {b.id: b.token_ids for b in tree if b.token_ids} == {b: t for b, t in sent.items() if t}
    first.abort("r1")
    first.step()
    assert_pool_empty(first)

    second = _engine(model)
    second.add_request(_request(stream=True, resume=tree))
    scheduled = second.scheduler.schedule
    steps: list[set[int]] = []  # branch ids scheduled in each of the resumed run's first steps

    def spy(drafts=None):
        out = scheduled(drafts)
        steps.append({sb.branch.id for sb in out.scheduled})
        if len(steps) == 4:
            second.scheduler.schedule = scheduled
        return out

    second.scheduler.schedule = spy
    new: dict[int, list[int]] = {}
    out = None
    peak = 0
    while out is None:
        for item in second.step():
            if isinstance(item, RequestOutput):
                out = item
            else:
                new.setdefault(item.branch_id, []).extend(item.new_token_ids)
                assert not (item.created and item.branch_id in sent), (
                    "an announced branch is not re-announced"
                )
        peak = max(peak, second.pool.num_blocks - second.pool.num_free)
    live = {b.id: b for b in tree if b.finish_reason is None}

    # The first step prefills the branches with no live parent; a child takes the shared prefix
    # from its parent once computed (no second copy of it) and prefills its own part a step later.
    def rejoin_step(b) -> int:
        return 0 if b.parent not in live else 1 + rejoin_step(live[b.parent])

    first_scheduled = {i: next(n for n, ids in enumerate(steps) if i in ids) for i in live}
    assert first_scheduled == {i: rejoin_step(b) for i, b in live.items()}
    context = len(PROMPT) + 48 + len(full.branches)  # the whole tree's tokens, [Child]s included
    assert peak <= -(-context // 16) + len(full.branches), "the shared prefix is stored once"
    assert out.text == full.text and out.num_tokens == full.num_tokens == 48
    for b in full.branches:  # each token exactly once: what was sent, then what the resumed run sent
        assert sent.get(b.id, []) + new.get(b.id, []) == b.token_ids, b.id
    assert_pool_empty(second)


def test_a_bad_resume_tree_is_a_typed_error():
    model = make_model("llama", seed=3)
    engine = _engine(model)
    from apar_worker.types import ResumedBranch

    bad = [ResumedBranch(0, None, None, [7, 8]), ResumedBranch(1, 0, 1, [9])]  # token 8 is no [Fork]
    with pytest.raises(InvalidRequestError, match="does not start at a \\[Fork\\]"):
        engine.add_request(_request(resume=bad))
    with pytest.raises(InvalidRequestError, match="root"):
        engine.add_request(_request(resume=[ResumedBranch(0, 0, 0, [])]))
    assert_pool_empty(engine)
