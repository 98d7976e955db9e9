"""Issue 18 hardening: what a hostile or careless client can do to the engine and the cluster.

Engine tests run in-process on a tiny random model; the cluster tests use the shared
`apar_cluster` (conftest.py) and talk to it over gRPC on 127.0.0.1 only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from pathlib import Path

import grpc
import pytest
from engine_utils import make_model, make_tokenizer

from apar_worker.engine import Engine, EngineConfig
from apar_worker.types import GenerateRequest, SamplingParams
from cluster.cli_serve import state_file
from protos.apar.v1 import apar_pb2 as pb
from protos.apar.v1 import apar_pb2_grpc as pb_grpc

# -- 4. the end of the model's context is "length" ------------------------------------------------


@pytest.mark.parametrize("fork", [False, True])
def test_branch_at_the_end_of_the_context_finishes_with_length(fork):
    engine = Engine.from_model(make_model("llama", max_len=64), make_tokenizer(), EngineConfig(block_size=4))
    prompt = [3 + i % 200 for i in range(56)]
    req = GenerateRequest(
        prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=200, ignore_eos=True), fork=fork
    )
    out = engine.generate([req])[0]
    assert out.num_tokens < 200, "the context must end the request before max_tokens"
    assert any(b.finish_reason == "length" for b in out.branches)
    assert out.finish_reason == "length"


# -- unit: what a client may be told, and how requests are decoded ---------------------------------


def test_client_message_is_the_replica_errors_own_line():
    from ray.exceptions import RayTaskError

    from apar_worker.types import InvalidRequestError
    from cluster.grpc_service import client_message

    cause = InvalidRequestError("prompt has 1024 tokens; the model's context is 1024 tokens")
    tb = 'Traceback (most recent call last):\n  File "/srv/apar/engine.py", line 1\n'
    wrapped = RayTaskError(
        "AparWorker.generate", tb, cause, proctitle="ray::ServeReplica", pid=4242, ip="10.1.2.3"
    )
    wrapped = wrapped.as_instanceof_cause()
    assert isinstance(wrapped, InvalidRequestError) and "pid=4242" in str(wrapped)
    assert client_message(wrapped) == str(cause)
    assert client_message(ValueError("\x1b[31mbad\x1b[0m thing\n  at /a/b.py")) == "bad thing"
    assert len(client_message(ValueError("x" * 5000))) <= 300


def test_parse_turns_bad_wire_data_into_typed_errors():
    from cluster.grpc_service import BadWireData, RequestTooLarge, parse

    good = pb.GenerateRequest(prompt="hi", max_tokens=3)
    assert parse(good.SerializeToString(), pb.GenerateRequest, 1024) == good
    assert parse(good, pb.GenerateRequest, 1024) is good
    for raw in (b"\xff\xff\xff\xff", b"\x0a\x02\xc3\x28"):  # garbage; prompt with invalid UTF-8
        with pytest.raises(BadWireData, match="not a valid apar.v1.GenerateRequest"):
            parse(raw, pb.GenerateRequest, 1024)
    with pytest.raises(RequestTooLarge, match="2000 bytes; the limit is 1024"):
        parse(b"\x00" * 2000, pb.GenerateRequest, 1024)


def test_engine_error_is_internal_with_a_request_id_only():
    from apar_worker.types import RequestOutput
    from cluster.ingress import _status_of

    req = GenerateRequest(prompt="hi", request_id="rq-1")
    out = RequestOutput(request_id="rq-1", text="", branches=[], finish_reason="error", prompt_tokens=1,
                        num_tokens=0, steps=0, cached_tokens=0, ttft_s=None, latency_s=0.0,
                        error="engine step failed: at /srv/x.py pid 77")  # fmt: skip
    err = _status_of(out, req, 0.0)
    assert err.code == grpc.StatusCode.INTERNAL
    assert err.message == "internal error (request id rq-1)"


def test_stop_strings_and_request_size_are_capped():
    from apar_worker.types import InvalidRequestError
    from cluster.config import load_config
    from cluster.protocol import MAX_STOP_CHARS, to_engine_request

    limits = load_config(None).limits
    assert limits.max_request_bytes == 4 * 2**20
    ok = pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(stop=["x" * MAX_STOP_CHARS] * 16))
    assert to_engine_request(ok, limits, stream=False).sampling.stop == ["x" * MAX_STOP_CHARS] * 16
    bad = pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(stop=["ok", "x" * (MAX_STOP_CHARS + 1)]))
    with pytest.raises(InvalidRequestError, match=r"sampling.stop\[1\]: at most 256 characters"):
        to_engine_request(bad, limits, stream=False)


# -- cluster: every error a client gets is a clean, typed status ----------------------------------

LEAKS = ("\x1b", "pid=", "ip=", "Traceback", "ray::", "actor_id", ".py", "File ")


def _rpc_error(call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call(*args, **kw)
        if not isinstance(result, pb.GenerateResponse | pb.CancelResponse):
            list(result)  # a stream: the status comes at its end
    details = err.value.details() or ""
    assert not any(leak in details for leak in LEAKS), f"internal details reached the client: {details!r}"
    assert "\n" not in details and len(details) <= 300, details
    return err.value


@pytest.fixture(scope="module")
def channel(apar_cluster):
    pids = {rid: load.pid for rid, load in apar_cluster.wait_replicas().items()}
    with grpc.insecure_channel(apar_cluster.address) as ch:
        yield ch
    # hostile input crashed no replica and leaked no KV block
    apar_cluster.wait_kv_free()
    assert {rid: load.pid for rid, load in apar_cluster.loads().items()} == pids


@pytest.fixture(scope="module")
def stub(channel) -> pb_grpc.AparServiceStub:
    return pb_grpc.AparServiceStub(channel)


def _calls(stub: pb_grpc.AparServiceStub) -> list:
    return [stub.Generate, stub.GenerateStream]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(
    "request_",
    [
        pb.GenerateRequest(prompt=" ".join(["sleep"] * 1023), max_tokens=8),
        pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")] * 2000, max_tokens=8),
    ],
    ids=["long prompt", "many messages"],
)
def test_prompt_over_the_context_is_one_clean_line(stub, request_):
    for call in _calls(stub):
        err = _rpc_error(call, request_, timeout=60)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert re.fullmatch(r"prompt has \d+ tokens; the model's context is \d+ tokens", err.details())


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("method", ["Generate", "GenerateStream", "Cancel"])
def test_undecodable_wire_data_is_invalid_argument(channel, method):
    path = f"/apar.v1.AparService/{method}"
    call = channel.unary_stream(path) if method == "GenerateStream" else channel.unary_unary(path)
    # garbage; a string field (prompt / request_id) holding invalid UTF-8
    for raw in (b"\xff\xfe\xfd\xfc\x00\x01", b"\x0a\x02\xc3\x28"):
        with pytest.raises(grpc.RpcError) as err:
            result = call(raw, timeout=30)
            if method == "GenerateStream":
                list(result)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "not a valid apar.v1." in err.value.details()
    health = channel.unary_unary("/grpc.health.v1.Health/Check")
    with pytest.raises(grpc.RpcError) as err:
        health(b"\x0a\x02\xc3\x28", timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.integration
@pytest.mark.slow
def test_stop_strings_and_request_size_are_capped_at_the_server(stub):
    long_stop = pb.GenerateRequest(prompt="hi", max_tokens=4, sampling=pb.SamplingParams(stop=["x" * 257]))
    huge_stops = pb.GenerateRequest(
        prompt="hi", max_tokens=4, sampling=pb.SamplingParams(stop=["x" * 2**21] * 16)
    )
    huge_prompt = pb.GenerateRequest(prompt="x" * (5 * 2**20), max_tokens=4)
    for call in _calls(stub):
        err = _rpc_error(call, long_stop, timeout=30)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.stop[0]" in err.details()
        for request_ in (huge_stops, huge_prompt):
            err = _rpc_error(call, request_, timeout=60)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            assert "larger than max" in err.details() or "the limit is" in err.details()


# -- 9. the replicas that ran a request -------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_final_names_every_replica_that_ran_the_request(stub):
    """Without a failover that is the one replica (the failover test checks the other case)."""
    req = pb.GenerateRequest(prompt="What are some tips for sleeping well?", max_tokens=8)
    resp = stub.Generate(req, timeout=120)
    assert resp.replica_id and list(resp.replica_ids) == [resp.replica_id]
    finals = [m.final for m in stub.GenerateStream(req, timeout=120) if m.HasField("final")]
    assert len(finals) == 1 and list(finals[0].replica_ids) == [finals[0].replica_id]


# -- 5. local mode listens on loopback only ----------------------------------------------------------


def _listening() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket, from /proc/net/tcp{,6}."""
    out = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/net/{name}") as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] != "0A":  # TCP_LISTEN
                    continue
                hex_ip, hex_port = fields[1].split(":")
                raw = bytes.fromhex(hex_ip)
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
                out[int(fields[9])] = (socket.inet_ntop(family, raw), int(hex_port, 16))
    return out


def _sockets_of_session(sid: int) -> dict[int, int]:
    """Socket inode -> pid for every process of session `sid` (apar serve and all it started)."""
    owned = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[3]) != sid:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    owned[int(target[8:-1])] = int(pid)
        except OSError:  # a process that just exited, or a file descriptor that just closed
            continue
    return owned


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@pytest.mark.integration
@pytest.mark.slow
def test_local_mode_listens_on_loopback_only(apar_cluster):
    """Every listening socket of the cluster's processes (apar serve runs in its own session:
    Ray's GCS, raylet, agents, workers, the Serve proxy and replicas) is on 127.0.0.1 / ::1."""
    listening = _listening()
    owned = _sockets_of_session(os.getsid(apar_cluster.proc.pid))
    ours = {inode: listening[inode] for inode in owned if inode in listening}
    ports = {port for _, port in ours.values()}
    metrics_port = int(
        json.loads(state_file(apar_cluster.grpc_port).read_text())["metrics_url"]
        .rsplit(":", 1)[1]
        .split("/")[0]
    )
    assert {apar_cluster.grpc_port, metrics_port} <= ports, f"the cluster's sockets were not found: {ours}"
    assert len(ours) >= 5, ours  # gRPC, HTTP, metrics, GCS, raylet at least
    wide = {
        f"{addr}:{port}": _cmdline(owned[inode])
        for inode, (addr, port) in ours.items()
        if not _is_loopback(addr)
    }
    assert not wide, f"listening on a non-loopback address (address: process): {wide}"


def _cmdline(pid: int) -> str:
    try:
        return f"{pid} " + Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:120]
    except OSError:
        return str(pid)


def test_grpc_address_is_moved_to_the_host():
    from cluster.loopback import grpc_address, is_loopback

    assert grpc_address("[::]:50051", "127.0.0.1") == "127.0.0.1:50051"
    assert grpc_address("[::]:0", "::1") == "[::1]:0"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.7")
