"""Acceptance 1 and 5 of the cluster: the gRPC API of a running `apar serve` (shared fixture).

1. A client generated here from protos/apar/v1/apar.proto (grpc_tools.protoc into a temp dir, run
   in its own process, not the project's client code) calls Generate and GenerateStream on the
   shipped model and gets a forked answer; stream events arrive before the request finishes.
5. Bad input gives INVALID_ARGUMENT / CANCELLED / DEADLINE_EXCEEDED with a message, no replica
   crashes, and every replica's KV blocks are back in the pool afterwards (from the replicas'
   own heartbeats in Redis).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cluster.cli_serve import state_file
from protos.apar.v1 import apar_pb2 as pb
from protos.apar.v1 import apar_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What are some tips for staying healthy?"
# Prompts whose answers are lists; acceptance 1 needs one the model answers with forks.
STRUCTURED_PROMPTS = [
    "Give me 5 tips to improve my productivity.",
    "What are some tips for staying healthy?",
    "How can I learn a new language quickly?",
]

# Runs in a separate interpreter with only the freshly generated stubs on its path.
FRESH_CLIENT = textwrap.dedent(
    """
    import json, sys, time
    import grpc
    from apar.v1 import apar_pb2, apar_pb2_grpc

    address, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    stub = apar_pb2_grpc.AparServiceStub(grpc.insecure_channel(address))
    for prompt in prompts:  # the first structured prompt the model forks on
        req = apar_pb2.GenerateRequest(
            messages=[apar_pb2.ChatMessage(role="user", content=prompt)], max_tokens=max_tokens
        )
        unary = stub.Generate(req, timeout=180)
        if len(unary.branches) > 1:
            break
    out = {"prompt": prompt, "unary": {
        "text": unary.text, "finish_reason": unary.finish_reason, "replica_id": unary.replica_id,
        "completion_tokens": unary.usage.completion_tokens, "steps": unary.usage.steps,
        "branches": [{"id": b.id, "parent": b.parent_id if b.HasField("parent_id") else None,
                      "text": b.text} for b in unary.branches],
    }, "stream": []}
    t0 = time.monotonic()
    for msg in stub.GenerateStream(req, timeout=180):
        t = time.monotonic() - t0
        if msg.HasField("final"):
            out["stream"].append({"t": t, "final": True, "text": msg.final.text,
                                  "branches": len(msg.final.branches), "replica_id": msg.final.replica_id})
        for e in msg.events:
            out["stream"].append({"t": t, "final": False, "branch": e.branch_id, "delta": e.delta_text,
                                  "created": e.created, "finish": e.finish_reason, "replica_id": e.replica_id})
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def fresh_client(tmp_path_factory) -> Path:
    """Stubs generated from the .proto now, plus the client script that uses only them."""
    tmp = tmp_path_factory.mktemp("fresh-stubs")
    src = tmp / "src" / "apar" / "v1"
    src.mkdir(parents=True)
    shutil.copy(ROOT / "protos" / "apar" / "v1" / "apar.proto", src / "apar.proto")
    gen = tmp / "gen"
    gen.mkdir()
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp / 'src'}", f"--python_out={gen}",
           f"--grpc_python_out={gen}", str(src / "apar.proto")]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    assert (gen / "apar" / "v1" / "apar_pb2_grpc.py").is_file()
    script = gen / "fresh_client.py"
    script.write_text(FRESH_CLIENT)
    return script


@pytest.fixture(scope="module")
def stub(apar_cluster) -> pb_grpc.AparServiceStub:
    channel = grpc.insecure_channel(apar_cluster.address)
    yield pb_grpc.AparServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def replicas_before(apar_cluster) -> dict[str, int]:
    """replica id -> pid at the start; a crash would change or drop an entry."""
    return {rid: load.pid for rid, load in apar_cluster.wait_replicas().items()}


def _long_request(request_id: str = "", **kw) -> pb.GenerateRequest:
    """A request that runs for many steps: sequential, EOS ignored."""
    return pb.GenerateRequest(
        prompt=PROMPT,
        max_tokens=1000,
        fork=False,
        sampling=pb.SamplingParams(ignore_eos=True),
        request_id=request_id or uuid.uuid4().hex,
        **kw,
    )


def _wait_owned(apar_cluster, request_id: str, timeout_s: float = 30.0) -> str:
    """Until a replica has claimed the request (it is decoding)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        owner = apar_cluster.state.owner(request_id)
        if owner:
            return owner
        time.sleep(0.05)
    raise AssertionError(f"no replica claimed {request_id}")


def _final_state(apar_cluster, request_id: str, timeout_s: float = 15.0) -> dict:
    """The replica's final record of a request (written when it ends, whatever the reason)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        p = apar_cluster.state.progress(request_id)
        if p and p.get("state") not in (None, "running"):
            return p
        time.sleep(0.1)
    raise AssertionError(
        f"request {request_id} has no final record: {apar_cluster.state.progress(request_id)}"
    )


def _tokens(progress: dict) -> int:
    return sum(len(b.get("tokens", [])) or b.get("num_tokens", 0) for b in progress["tree"].values())


# -- acceptance 1 ------------------------------------------------------------------------------


def test_fresh_stub_client_gets_forked_answer_and_live_stream(apar_cluster, fresh_client, replicas_before):
    run = subprocess.run(
        [sys.executable, str(fresh_client), apar_cluster.address, "200", *STRUCTURED_PROMPTS],
        capture_output=True,
        text=True,
        timeout=480,
        cwd=fresh_client.parent,  # only the fresh stubs are importable as `apar.v1`
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)

    unary = out["unary"]
    assert unary["finish_reason"] in ("stop", "length")
    branches = unary["branches"]
    assert len(branches) > 1, f"no forked answer to any of {STRUCTURED_PROMPTS}: last {unary['text']!r}"
    ids = {b["id"] for b in branches}
    assert [b for b in branches if b["parent"] is None] == [branches[0]]
    assert all(b["parent"] in ids for b in branches[1:])
    # the answer is assembled from the branches: children are spliced into their parent's text
    parents = {b["parent"] for b in branches}
    for leaf in (b for b in branches if b["id"] not in parents):
        assert leaf["text"] in unary["text"]
    assert sorted(unary["text"]) == sorted("".join(b["text"] for b in branches))
    assert unary["replica_id"] in replicas_before
    assert 0 < unary["completion_tokens"] <= 200 and unary["steps"] < unary["completion_tokens"]

    stream = out["stream"]
    finals = [m for m in stream if m["final"]]
    events = [m for m in stream if not m["final"]]
    assert len(finals) == 1 and stream[-1] is finals[0], "exactly one final message, last"
    assert finals[0]["branches"] > 1
    assert len({e["branch"] for e in events}) == finals[0]["branches"]
    assert sum(e["created"] for e in events) >= finals[0]["branches"] - 1  # children announce themselves
    # per-branch deltas add up to the final answer's text (modulo ordering across branches;
    # U+FFFD marks bytes a streaming detokenizer holds back until they form a character)
    streamed = "".join(e["delta"] for e in events).replace("\ufffd", "")
    assert sorted(streamed) == sorted(finals[0]["text"].replace("\ufffd", ""))
    # events are streamed while decoding, not in one burst with the result
    t_final = finals[0]["t"]
    early = [e for e in events if e["t"] < t_final - 0.05]
    assert len(early) >= 3 and len({round(e["t"], 3) for e in early}) >= 3
    # every event of the request came from the replica that produced the final answer
    assert {e["replica_id"] for e in events} == {finals[0]["replica_id"]}


def _scrape(url: str) -> dict[str, float]:
    """Sum of every `ray_apar_*` series by metric name."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ray_apar_"):
            name, value = line.split("{", 1)[0], float(line.rsplit(" ", 1)[1])
            totals[name] = totals.get(name, 0.0) + value
    return totals


def test_prometheus_metrics(apar_cluster, stub):
    resp = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=64), timeout=120)
    url = json.loads(state_file(apar_cluster.grpc_port).read_text())["metrics_url"]
    wanted = {
        "ray_apar_requests_total": 1,
        "ray_apar_branches_total": len(resp.branches),
        "ray_apar_generated_tokens_total": resp.usage.completion_tokens,
        "ray_apar_engine_steps_total": resp.usage.steps,
        "ray_apar_time_to_first_token_seconds_count": 1,
        "ray_apar_time_per_output_token_seconds_count": 1,
    }
    deadline = time.monotonic() + 60
    while True:  # Ray exports on a period of a few seconds
        got = _scrape(url)
        if all(got.get(k, 0) >= v for k, v in wanted.items()):
            break
        assert time.monotonic() < deadline, f"metrics missing: want at least {wanted}, got {got}"
        time.sleep(1)
    for gauge in (
        "ray_apar_kv_cache_usage_ratio",
        "ray_apar_prefix_cache_hit_rate",
        "ray_apar_running_requests",
    ):
        assert gauge in got
    if len(resp.branches) > 1:
        assert got.get("ray_apar_forks_total", 0) >= len(resp.branches) - 1


def test_health_and_reflection(apar_cluster):
    with grpc.insecure_channel(apar_cluster.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "apar.v1.AparService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(reflection.ServerReflectionInfo(iter([req]), timeout=30))
        names = {s.name for s in resp.list_services_response.service}
        assert {"apar.v1.AparService", "grpc.health.v1.Health"} <= names
        req = reflection_pb2.ServerReflectionRequest(file_containing_symbol="apar.v1.AparService")
        (resp,) = list(reflection.ServerReflectionInfo(iter([req]), timeout=30))
        assert resp.file_descriptor_response.file_descriptor_proto, "reflection should describe the API"


# -- acceptance 5 ------------------------------------------------------------------------------

_USER = pb.ChatMessage(role="user", content="hi")
BAD_REQUESTS = {
    "no prompt": (pb.GenerateRequest(), "prompt or messages"),
    "blank prompt": (pb.GenerateRequest(prompt="   "), "prompt must not be empty"),
    "prompt and messages": (pb.GenerateRequest(prompt="a", messages=[_USER]), "not both"),
    "bad role": (pb.GenerateRequest(messages=[pb.ChatMessage(role="robot", content="x")]), "role"),
    "max_tokens 0": (pb.GenerateRequest(prompt="a", max_tokens=0), "max_tokens"),
    "max_tokens negative": (pb.GenerateRequest(prompt="a", max_tokens=-3), "max_tokens"),
    "max_tokens over limit": (pb.GenerateRequest(prompt="a", max_tokens=1025), "limit 1024"),
    "top_p": (pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
    "temperature": (
        pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(temperature=-1)),
        "temperature",
    ),
    "top_k": (pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(top_k=-2)), "top_k"),
    "max_branches 0": (pb.GenerateRequest(prompt="a", max_branches=0), "max_branches"),
    "max_branches huge": (pb.GenerateRequest(prompt="a", max_branches=10**6), "max_branches"),
    "timeout negative": (pb.GenerateRequest(prompt="a", timeout_s=-1), "timeout_s"),
    "empty stop string": (pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(stop=[""])), "stop"),
    "oversized prompt": (pb.GenerateRequest(prompt="x" * 1_000_000), "prompt too long"),
    # under the character limit but longer than the model's context: rejected by the engine itself
    "prompt over the context": (pb.GenerateRequest(prompt="7 " * 8000), "context"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_is_invalid_argument(stub, name):
    request, needle = BAD_REQUESTS[name]
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert needle in err.value.details()


def test_cancelled_stream_is_aborted_on_the_replica(apar_cluster, stub):
    rid = uuid.uuid4().hex
    call = stub.GenerateStream(_long_request(rid), timeout=120)
    got = 0
    # cancel at the first chunk: the native engine decodes a tiny model's 1000 tokens in about a second
    for _ in call:
        got += 1
        break
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    final = _final_state(apar_cluster, rid)
    assert final["state"] in ("cancelled", "aborted"), (got, _tokens(final), final.get("state"))
    assert _tokens(final) < 1000, "the replica must stop decoding a cancelled request"
    apar_cluster.wait_kv_free()


def test_cancel_rpc(apar_cluster, stub):
    rid = uuid.uuid4().hex
    future = stub.Generate.future(_long_request(rid), timeout=120)
    _wait_owned(apar_cluster, rid)
    assert stub.Cancel(pb.CancelRequest(request_id=rid), timeout=30).cancelled
    with pytest.raises(grpc.RpcError) as err:
        future.result()
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert rid in err.value.details()
    assert not stub.Cancel(pb.CancelRequest(request_id=rid), timeout=30).cancelled  # no longer in flight
    with pytest.raises(grpc.RpcError) as err:
        stub.Cancel(pb.CancelRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _final_state(apar_cluster, rid)["state"] in ("cancelled", "aborted")
    apar_cluster.wait_kv_free()


def test_cancel_reaches_the_request_on_any_ingress_replica(apar_cluster, stub):
    """Two ingress replicas: the proxy sends Cancel to either; it must find the request anyway."""
    for _ in range(6):
        rid = uuid.uuid4().hex
        future = stub.Generate.future(_long_request(rid), timeout=120)
        _wait_owned(apar_cluster, rid)
        assert stub.Cancel(pb.CancelRequest(request_id=rid), timeout=30).cancelled
        with pytest.raises(grpc.RpcError) as err:
            future.result()
        assert err.value.code() == grpc.StatusCode.CANCELLED
    apar_cluster.wait_kv_free()


def test_expired_deadlines(apar_cluster, stub):
    # the client's gRPC deadline
    rid = uuid.uuid4().hex
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(_long_request(rid), timeout=1.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert err.value.details()
    assert _final_state(apar_cluster, rid)["state"] in ("cancelled", "aborted", "deadline")
    # the request's own server-side timeout, on a unary and a streaming call
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(_long_request(timeout_s=0.5), timeout=60)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "timeout_s=0.5" in err.value.details()
    rid = uuid.uuid4().hex
    call = stub.GenerateStream(_long_request(rid, timeout_s=0.5), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _final_state(apar_cluster, rid)["state"] == "deadline"
    apar_cluster.wait_kv_free()


def test_no_replica_crashed_and_kv_pool_is_full(apar_cluster, stub, replicas_before):
    """Runs after the bad-input tests: same replica processes, all blocks free, still serving."""
    apar_cluster.wait_kv_free()
    now = {rid: load.pid for rid, load in apar_cluster.loads().items()}
    assert now == replicas_before
    resp = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=16), timeout=120)
    assert resp.usage.completion_tokens > 0 and resp.finish_reason in ("stop", "length")
