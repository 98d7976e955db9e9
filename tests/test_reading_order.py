"""Reading-order streaming: deltas of the assembled answer, final as soon as they can be."""

from __future__ import annotations

import pytest

from apar_worker.reading_order import ReadingOrder
from apar_worker.types import BranchEvent, GenerateRequest, RequestOutput, SamplingParams


def ev(
    branch: int, parent: int | None, text: str = "", created: bool = False, end: bool = False
) -> BranchEvent:
    return BranchEvent("r", branch, parent, [], text, created, "stop" if end else None)


def test_root_text_is_immediate_and_later_children_wait_for_earlier_ones():
    ro = ReadingOrder()
    assert ro.feed(ev(0, None, "Tips:\n1. A:", created=True)) == "Tips:\n1. A:"
    assert ro.feed(ev(1, 0, created=True)) == ""  # child 1 forked at "1. A:"
    assert ro.feed(ev(0, None, "\n2. B:")) == ""  # root text after child 1: waits for it
    assert ro.feed(ev(2, 0, created=True)) == ""
    assert ro.feed(ev(1, 0, " body one")) == " body one"  # child 1 is next in reading order: live
    assert ro.feed(ev(2, 0, " body two")) == ""  # child 2 waits for child 1 and the root's "2. B:"
    assert ro.feed(ev(1, 0, ".", end=True)) == ".\n2. B: body two"
    assert ro.feed(ev(0, None, "\nDone.", end=True)) == ""  # after child 2, which is still running
    assert ro.feed(ev(2, 0, "!", end=True)) == "!\nDone."
    assert ro.emitted == "Tips:\n1. A: body one.\n2. B: body two!\nDone."


def test_nested_children_and_finish_flushes_everything():
    ro = ReadingOrder()
    out = [
        ro.feed(ev(0, None, "a", created=True)),
        ro.feed(ev(1, 0, created=True)),
        ro.feed(ev(0, None, "d")),
    ]
    out += [ro.feed(ev(1, 0, "b")), ro.feed(ev(2, 1, created=True)), ro.feed(ev(1, 0, "c"))]
    out += [ro.feed(ev(2, 1, "x"))]
    assert "".join(out) == "abx"  # grandchild 2 sits between "b" and "c" of child 1
    assert ro.finish() == "cd"
    assert ro.emitted == "abxcd"


@pytest.fixture(scope="module")
def tiny_engine():
    from apar_worker.engine import Engine, EngineConfig

    return Engine(EngineConfig(model="apar-tiny", device="cpu", kv_cache_memory_mb=64))


PROMPTS = [
    "What are some tips for staying healthy?",
    "What are the benefits of exercise?",
    "Give me some ideas for a birthday party.",
    "What are some ways to save money?",
    "How can I improve my writing skills?",
    "List some tips for learning to cook.",
]


@pytest.mark.integration
@pytest.mark.parametrize("seed", [None, 7])
def test_ordered_deltas_equal_the_assembled_answer(tiny_engine, seed):
    """On the shipped byte-level model (it forks on list prompts), greedy and seeded, batched."""
    temp = 0.0 if seed is None else 0.8
    reqs = [
        GenerateRequest(
            messages=[{"role": "user", "content": p}],
            sampling=SamplingParams(max_tokens=160, temperature=temp, seed=seed),
            stream=True,
        )
        for p in PROMPTS
    ]
    orders = {r.request_id: ReadingOrder() for r in reqs}
    first_delta: dict[str, int] = {}
    first_root: dict[str, int] = {}
    outputs: dict[str, RequestOutput] = {}
    for r in reqs:
        tiny_engine.add_request(r)
    step = 0
    while len(outputs) < len(reqs):
        step += 1
        for item in tiny_engine.step():
            if isinstance(item, RequestOutput):
                outputs[item.request_id] = item
                continue
            rid = item.request_id
            if item.branch_id == 0 and item.new_token_ids:
                first_root.setdefault(rid, step)
            if orders[rid].feed(item):
                first_delta.setdefault(rid, step)
    forked = 0
    for r in reqs:
        out = outputs[r.request_id]
        ro = orders[r.request_id]
        ro.finish()
        assert ro.emitted == out.text
        assert first_delta[r.request_id] <= first_root[r.request_id]
        forked += len(out.branches) > 2
    assert forked >= 3, "the shipped model should fork on most list prompts"


@pytest.mark.integration
@pytest.mark.slow
def test_grpc_ordered_stream_adds_up_to_the_final_text(apar_cluster):
    """`GenerateStream(ordered=true)` through the real cluster: deltas == final text, sent early."""
    import grpc

    from protos.apar.v1 import apar_pb2 as pb
    from protos.apar.v1 import apar_pb2_grpc as pb_grpc

    stub = pb_grpc.AparServiceStub(grpc.insecure_channel(apar_cluster.address))
    forked = 0
    for i, prompt in enumerate(PROMPTS[:4]):
        sampling = pb.SamplingParams(temperature=0.7, seed=i) if i % 2 else pb.SamplingParams()
        req = pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content=prompt)],
            max_tokens=96,
            ordered=True,
            sampling=sampling,
        )
        deltas, first_delta, first_root, final = [], None, None, None
        for n, msg in enumerate(stub.GenerateStream(req, timeout=120)):
            if msg.ordered_delta and first_delta is None:
                first_delta = n
            if first_root is None and any(e.branch_id == 0 and e.num_new_tokens for e in msg.events):
                first_root = n
            deltas.append(msg.ordered_delta)
            if msg.HasField("final"):
                final = msg.final
        assert final is not None and "".join(deltas) == final.text
        assert first_delta is not None and first_delta <= first_root
        forked += len(final.branches) > 1
    assert forked >= 1
    plain = stub.GenerateStream(pb.GenerateRequest(prompt="hello", max_tokens=8), timeout=60)
    assert all(not m.ordered_delta for m in plain)  # off unless asked for: old clients see no change
