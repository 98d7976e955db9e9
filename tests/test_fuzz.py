"""Issue 18, fuzzing: random requests and random bytes against the running cluster (hypothesis).

The cluster test: each hypothesis example is a batch of calls sent concurrently to the shared
`apar_cluster` (conftest.py): GenerateRequests with random fields (Generate mostly, some
GenerateStream), Cancels of request ids the batch may share, and raw bytes (random, or a valid
request's bytes mutated) sent without a serializer; over 2,000 calls a run. Every answer must be
OK or a typed status with a short, clean message (never UNKNOWN / INTERNAL), consistent with
what was asked; afterwards every replica's KV blocks are free and no replica restarted. Valid
requests ask for 1-4 tokens mostly, so the run stays short. Shrinking is off (a failing batch
would be re-sent many times against a live server); the assertion names the failing call.

The offline test: whatever sampling parameters the ingress lets through, the sampler samples.
"""

from __future__ import annotations

import collections
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from apar_worker.sampling import make_generator, sample
from apar_worker.types import InvalidRequestError
from cluster.config import load_config
from cluster.protocol import to_engine_request
from protos.apar.v1 import apar_pb2 as pb
from protos.apar.v1 import apar_pb2_grpc as pb_grpc

MIN_REQUESTS = 2000
BATCHES = 170  # hypothesis examples; each is a batch of BATCH_SIZE calls
BATCH_SIZE = (12, 16)
THREADS = 8
CALL_TIMEOUT_S = 120.0  # client deadline: a call that reaches it is a hang, reported as such
MAX_DETAILS_CHARS = 500
SERVICE = "/apar.v1.AparService"
ID_POOL = [f"fuzz-{i}" for i in range(4)]  # shared request ids: collisions and Cancel targets

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
SPECIALS = ["[Fork]", "[Child]", "<|im_end|>", "<|im_start|>", "<|endoftext|>", "\x00", "\n", " ", "\u200b"]

# -- strategies ------------------------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, picked with the given weights (st.one_of picks uniformly)."""
    picks = [s for w, s in choices for _ in range(w)]
    return st.sampled_from(range(len(picks))).flatmap(lambda i: picks[i])


special = st.sampled_from(SPECIALS)
short_text = st.text(min_size=1, max_size=24)  # any code point but surrogates: NUL, controls, emoji ...
text = weighted(
    (4, short_text),
    (3, st.lists(st.one_of(special, short_text), min_size=1, max_size=5).map("".join)),
    (2, st.sampled_from(["What are some tips for sleeping well?", "Give me 3 tips.", "hi", "Ünïcødé 💤"])),
    (1, st.sampled_from(["", "   ", "\n\t", "\x00"])),
)
prompt = weighted(
    (12, text),
    (1, st.integers(16385, 17000).map(lambda n: "a" * n)),  # over max_prompt_chars
    (1, st.integers(300, 1500).map(lambda n: "sleep " * n)),  # may be over the model's context
)
role = weighted(
    (12, st.sampled_from(["system", "user", "assistant"])), (1, st.sampled_from(["", "tool", "USER"]))
)
message = st.builds(pb.ChatMessage, role=role, content=text)


def _maybe(strategy: st.SearchStrategy, p_set: int = 2) -> st.SearchStrategy:
    """None (field unset) about 1 time in p_set + 1, else a value."""
    return weighted((1, st.none()), (p_set, strategy))


float32 = st.floats(width=32)  # nan, inf, subnormals, -0.0 ...
max_tokens = weighted(
    (16, st.integers(1, 4)),
    (1, st.none()),  # the server's default (128 in the test config)
    (2, st.sampled_from([0, -1, 1025, 2**31 - 1, -(2**31)])),
    (1, INT32),
)


@st.composite
def sampling(draw) -> pb.SamplingParams:
    s = pb.SamplingParams()
    temperature = draw(_maybe(weighted((6, st.floats(0, 2)), (1, float32))))
    if temperature is not None:
        s.temperature = temperature
    top_k = draw(_maybe(weighted((6, st.integers(0, 100)), (1, INT32))))
    if top_k is not None:
        s.top_k = top_k
    top_p = draw(_maybe(weighted((6, st.floats(0.01, 1)), (1, float32))))
    if top_p is not None:
        s.top_p = top_p
    penalty = draw(_maybe(weighted((6, st.floats(0.5, 2)), (1, float32))))
    if penalty is not None:
        s.repetition_penalty = penalty
    seed = draw(_maybe(INT64))
    if seed is not None:
        s.seed = seed
    s.stop.extend(
        draw(
            weighted(
                (16, st.lists(st.one_of(special, st.text(min_size=1, max_size=8)), max_size=3)),
                (1, st.lists(st.text(max_size=2), min_size=1, max_size=3)),  # maybe an empty one
                (1, st.lists(st.just("x"), min_size=17, max_size=20)),  # too many
                (1, st.integers(257, 300).map(lambda n: ["y" * n])),  # too long
            )
        )
    )
    s.ignore_eos = draw(st.booleans())
    return s


@st.composite
def generate_request(draw) -> pb.GenerateRequest:
    msg = pb.GenerateRequest()
    kind = draw(st.sampled_from(["prompt"] * 12 + ["messages"] * 6 + ["both", "neither"]))
    if kind in ("prompt", "both"):
        msg.prompt = draw(prompt)
    if kind in ("messages", "both"):
        msg.messages.extend(draw(st.lists(message, min_size=kind == "messages", max_size=4)))
    if draw(st.booleans()):
        msg.sampling.CopyFrom(draw(sampling()))
    n = draw(max_tokens)
    if n is not None:
        msg.max_tokens = n
    for name, strategy in (
        ("fork", st.booleans()),
        ("max_branches", weighted((10, st.integers(1, 8)), (1, INT32))),
        ("max_depth", weighted((10, st.integers(0, 3)), (1, INT32))),
    ):
        value = draw(_maybe(strategy, p_set=1))
        if value is not None:
            setattr(msg, name, value)
    msg.session_id = draw(
        weighted((6, st.just("")), (3, st.sampled_from(["s1", "s2"])), (1, st.text(max_size=12)))
    )
    msg.request_id = draw(
        weighted(
            (10, st.just("")),
            (4, st.sampled_from(ID_POOL)),
            (1, st.text(max_size=12)),
            (1, st.just("r" * 129)),
        )
    )
    msg.timeout_s = draw(
        weighted(
            (12, st.just(0.0)),
            (2, st.floats(1, 600)),
            (1, st.floats(0.0005, 0.05)),  # so short it ends the request: DEADLINE_EXCEEDED
            (1, st.floats()),  # nan, inf, negative, huge
        )
    )
    msg.ordered = draw(st.booleans())
    return msg


def mutate(raw: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """A valid message's bytes with bytes replaced, dropped or inserted (op, position, byte)."""
    out = bytearray(raw)
    for op, pos, byte in edits:
        if not out:
            break
        pos %= len(out)
        if op == 0:
            out[pos] = byte
        elif op == 1:
            del out[pos]
        elif op == 2:
            out.insert(pos, byte)
        else:
            del out[pos:]
    return bytes(out)


raw_bytes = st.one_of(
    st.binary(max_size=64),
    st.builds(
        mutate,
        generate_request().map(lambda m: m.SerializeToString()),
        st.lists(
            st.tuples(st.integers(0, 3), st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=4
        ),
    ),
)


@dataclass(frozen=True)
class Call:
    kind: str  # "unary" | "stream" | "raw" | "cancel"
    method: str  # Generate | GenerateStream | Cancel
    msg: pb.GenerateRequest | None = None
    raw: bytes = b""
    cancel_id: str = ""

    def describe(self) -> str:
        body = repr(self.raw[:300]) if self.kind == "raw" else repr(self.cancel_id) if self.cancel_id else ""
        if self.msg is not None:
            body = repr(self.msg)[:2000]
        return f"{self.kind} {self.method}: {body}"


call = weighted(
    (12, generate_request().map(lambda m: Call("unary", "Generate", msg=m))),
    (4, generate_request().map(lambda m: Call("stream", "GenerateStream", msg=m))),
    (
        3,
        st.tuples(st.sampled_from(["Generate", "GenerateStream", "Cancel"]), raw_bytes).map(
            lambda t: Call("raw", t[0], raw=t[1])
        ),
    ),
    (
        1,
        st.one_of(st.sampled_from(ID_POOL), st.text(max_size=8)).map(
            lambda i: Call("cancel", "Cancel", cancel_id=i)
        ),
    ),
)
batch = st.lists(call, min_size=BATCH_SIZE[0], max_size=BATCH_SIZE[1])


# -- sending one call ------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    messages: list  # responses (unary: one; stream: all; raw: the response bytes)


def send(channel: grpc.Channel, stub: pb_grpc.AparServiceStub, c: Call) -> Outcome:
    try:
        if c.kind == "unary":
            out = [stub.Generate(c.msg, timeout=CALL_TIMEOUT_S)]
        elif c.kind == "stream":
            out = list(stub.GenerateStream(c.msg, timeout=CALL_TIMEOUT_S))
        elif c.kind == "cancel":
            out = [stub.Cancel(pb.CancelRequest(request_id=c.cancel_id), timeout=CALL_TIMEOUT_S)]
        else:  # raw bytes, no serializer on either side
            path = f"{SERVICE}/{c.method}"
            if c.method == "GenerateStream":
                out = list(channel.unary_stream(path)(c.raw, timeout=CALL_TIMEOUT_S))
            else:
                out = [channel.unary_unary(path)(c.raw, timeout=CALL_TIMEOUT_S)]
        return Outcome(grpc.StatusCode.OK, "", out)
    except grpc.RpcError as err:
        return Outcome(err.code(), err.details() or "", [])


# -- what a call may get back ----------------------------------------------------------------------


def _clean(details: str) -> str | None:
    """Why a status message is not clean, or None."""
    for leak in ("Traceback", 'File "', "\x1b"):
        if leak in details:
            return f"contains {leak!r}"
    if len(details) >= MAX_DETAILS_CHARS:
        return f"{len(details)} characters"
    if not details:
        return "empty"
    return None


def _locally_valid(msg: pb.GenerateRequest, limits) -> bool:
    """Whether the ingress's own validation (cluster.protocol) accepts it; the engine may still
    reject it (e.g. a prompt over the model's context), also as INVALID_ARGUMENT."""
    try:
        to_engine_request(msg, limits, stream=False)
    except InvalidRequestError:
        return False
    return True


def _parsed(c: Call):
    """The message a call carries (raw bytes decoded as the server would), or None."""
    if c.kind != "raw":
        return c.msg
    try:
        return (pb.CancelRequest if c.method == "Cancel" else pb.GenerateRequest).FromString(c.raw)
    except Exception:  # DecodeError, or a string field that is not UTF-8
        return None


def _request_id(c: Call) -> str | None:
    msg = _parsed(c)
    return msg.request_id if isinstance(msg, pb.GenerateRequest) else None


def _cancel_id(c: Call) -> str | None:
    if c.kind == "cancel":
        return c.cancel_id
    msg = _parsed(c)
    return msg.request_id if isinstance(msg, pb.CancelRequest) else None


def check(c: Call, o: Outcome, batch_: list[Call], limits, replica_ids: set[str]) -> None:
    where = f"{c.describe()}\n-> {o.code.name} {o.details!r}"
    assert o.code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), where
    if o.code != grpc.StatusCode.OK:
        why = _clean(o.details)
        assert why is None, f"status message not clean ({why}): {where}"
    msg = _parsed(c)
    if c.kind == "raw":
        if msg is None:
            assert o.code == grpc.StatusCode.INVALID_ARGUMENT, where
            assert "not a valid apar.v1." in o.details, where
            return
        if c.method == "Cancel":
            assert o.code == (grpc.StatusCode.OK if msg.request_id else grpc.StatusCode.INVALID_ARGUMENT), (
                where
            )
            return
    if c.kind == "cancel":
        if c.cancel_id:
            assert o.code == grpc.StatusCode.OK, where
        else:
            assert o.code == grpc.StatusCode.INVALID_ARGUMENT, where
        return

    valid = _locally_valid(msg, limits)
    if not valid:
        assert o.code == grpc.StatusCode.INVALID_ARGUMENT, where
        return
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
    if msg.timeout_s > 0:
        allowed.add(grpc.StatusCode.DEADLINE_EXCEEDED)
    if msg.request_id:
        # a batch-mate has the id, or (an id of the pool) a call of an earlier batch that its
        # worker replica is still closing
        if msg.request_id in ID_POOL or sum(_request_id(x) == msg.request_id for x in batch_) > 1:
            allowed.add(grpc.StatusCode.ALREADY_EXISTS)
        if any(_cancel_id(x) == msg.request_id for x in batch_):
            allowed.add(grpc.StatusCode.CANCELLED)
    assert o.code in allowed, where
    if o.code == grpc.StatusCode.DEADLINE_EXCEEDED:  # the server's timeout_s, not our deadline (a hang)
        assert "exceeded timeout_s" in o.details, where
    if o.code == grpc.StatusCode.INVALID_ARGUMENT:
        assert "prompt has" in o.details or "token" in o.details, f"the ingress accepted it: {where}"
    if o.code != grpc.StatusCode.OK or c.kind == "raw":
        return

    # OK: the answer is consistent with the request
    limit = msg.max_tokens if msg.HasField("max_tokens") else limits.default_max_tokens
    if c.kind == "unary":
        final, stream = o.messages[0], []
    else:
        assert o.messages and o.messages[-1].HasField("final"), f"no final message: {where}"
        stream, final = o.messages[:-1], o.messages[-1].final
        assert not any(m.HasField("final") for m in stream), f"final before the end: {where}"
        assert len({m.request_id for m in o.messages}) == 1, where
        assert o.messages[0].request_id == final.request_id, where
        # Known engine gaps, so only checked this far: a stop string cuts the branch's final text
        # after the event of that step carried the whole token's text (so neither the events nor
        # the ordered deltas add up to it then); and a branch that ends on an incomplete UTF-8
        # sequence has a final "\ufffd" its events never carried.
        if not msg.sampling.stop:
            if msg.ordered:
                assert "".join(m.ordered_delta for m in o.messages) == final.text, where
            deltas = collections.defaultdict(str)
            for m in stream:
                for e in m.events:
                    deltas[e.branch_id] += e.delta_text
            for b in final.branches:
                assert b.text.startswith(deltas[b.id]), f"branch {b.id}: {deltas[b.id]!r}: {where}"
    assert final.finish_reason in ("stop", "length"), where
    if msg.request_id:
        assert final.request_id == msg.request_id, where
    assert 0 <= final.usage.completion_tokens <= limit, where
    assert final.usage.num_branches == len(final.branches) >= 1, where
    assert len(final.branches) <= (msg.max_branches if msg.HasField("max_branches") else 32), where
    assert final.replica_id in replica_ids and list(final.replica_ids)[-1] == final.replica_id, where
    for b in final.branches:
        assert b.finish_reason in ("stop", "length"), where


# -- offline: what the ingress accepts, the sampler can sample ------------------------------------


@settings(max_examples=500, deadline=None, database=None)
@given(
    sampling_=st.builds(
        pb.SamplingParams,
        temperature=float32,
        top_k=INT32,
        top_p=st.one_of(float32, st.floats(0.01, 1)),
        repetition_penalty=st.one_of(float32, st.floats(0.5, 2)),
        seed=INT64,
    ),
    logits=st.lists(st.floats(-100, 100, width=32), min_size=8, max_size=8),
    history=st.lists(st.integers(0, 7), max_size=8),
)
@example(pb.SamplingParams(temperature=1.17549435e-38), [50.0] * 8, [])  # found by the cluster fuzz test
@example(pb.SamplingParams(temperature=1.0, repetition_penalty=1e-38), [50.0] * 8, [3])
@example(pb.SamplingParams(temperature=1.0, repetition_penalty=3e38), [-50.0] * 8, list(range(8)))
def test_sampling_the_ingress_accepts_never_fails_a_step(sampling_, logits, history):
    """An engine step that raises fails every request on the replica: a request whose sampling
    parameters would make NaN probabilities (temperature 1e-38, say) is INVALID_ARGUMENT."""
    limits = load_config(None).limits
    msg = pb.GenerateRequest(prompt="hi", max_tokens=1, sampling=sampling_)
    try:
        params = to_engine_request(msg, limits, stream=False).sampling
    except InvalidRequestError:
        return
    row = torch.tensor([logits], dtype=torch.float32)
    row[0, 0] = -math.inf  # a banned token (APAR rules)
    (token,) = sample(row, [params], [history], [make_generator(params.seed, 0)])
    assert 1 <= token < 8


# -- the cluster test ------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_random_requests_get_ok_or_a_clean_typed_status(apar_cluster):
    limits = load_config(str(apar_cluster.log_path.parent / "config.yaml")).limits
    before = {rid: load.pid for rid, load in apar_cluster.wait_replicas().items()}
    apar_cluster.wait_kv_free()
    codes: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    t0 = time.monotonic()

    with grpc.insecure_channel(apar_cluster.address) as channel, ThreadPoolExecutor(THREADS) as pool:
        stub = pb_grpc.AparServiceStub(channel)

        @settings(
            max_examples=BATCHES,
            deadline=None,
            database=None,  # nothing written to .hypothesis/ in the checkout
            phases=[Phase.generate],  # no shrinking against a live server (see the docstring)
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
                HealthCheck.large_base_example,
            ],
        )
        @given(batch_=batch)
        def fuzz(batch_: list[Call]) -> None:
            outcomes = list(pool.map(lambda c: send(channel, stub, c), batch_))
            for c, o in zip(batch_, outcomes, strict=True):
                codes[o.code.name] += 1
                kinds[c.kind] += 1
            for c, o in zip(batch_, outcomes, strict=True):
                check(c, o, batch_, limits, set(before))

        fuzz()

    elapsed = time.monotonic() - t0
    total = sum(codes.values())
    print(f"\nfuzz: {total} requests in {elapsed:.1f}s; by kind {dict(kinds)}; statuses {dict(codes)}")
    assert total >= MIN_REQUESTS, f"only {total} requests were sent: {dict(kinds)}"
    assert codes["OK"] > total // 10, f"too few requests succeeded to exercise the engine: {dict(codes)}"
    assert not codes["UNKNOWN"] and not codes["INTERNAL"], dict(codes)
    # nothing leaked a KV block, no replica restarted
    apar_cluster.wait_kv_free(timeout_s=60)
    assert {rid: load.pid for rid, load in apar_cluster.loads().items()} == before
