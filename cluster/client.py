"""`apar generate --server HOST:PORT`: the same command as local generation, over gRPC.

The flags are those of local `apar generate` (apar_worker.cli_generate) and are validated the
same way before anything is sent. On a terminal the branches stream live (GenerateStream); else
one unary Generate call. `--json` prints the same object as local mode, plus `replica_id`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import grpc

from apar_worker.cli_generate import LiveView, build_request, fail
from apar_worker.types import AparError, GenerateRequest
from protos.apar.v1 import apar_pb2 as pb
from protos.apar.v1 import apar_pb2_grpc as pb_grpc

_USER_ERRORS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND)


def to_proto(req: GenerateRequest) -> pb.GenerateRequest:
    """The gRPC form of a validated engine request (the reverse of cluster.protocol)."""
    s = req.sampling
    sampling = pb.SamplingParams(
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        repetition_penalty=s.repetition_penalty,
        stop=s.stop,
        ignore_eos=s.ignore_eos,
    )
    if s.seed is not None:
        sampling.seed = s.seed
    msg = pb.GenerateRequest(
        sampling=sampling,
        max_tokens=s.max_tokens,
        fork=req.fork,
        max_branches=req.max_branches,
        max_depth=req.max_depth,
        session_id=req.session_id or "",
        request_id=req.request_id,
        speculative=req.speculative or "",
    )
    if req.messages is not None:
        msg.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in req.messages)
    else:
        msg.prompt = req.prompt or ""
    return msg


def response_json(resp: pb.GenerateResponse, latency_s: float) -> dict:
    """Same keys as `RequestOutput.to_json` in local mode, plus the replica that ran it."""
    return {
        "text": resp.text,
        "branches": [
            {
                "id": b.id,
                "parent": b.parent_id if b.HasField("parent_id") else None,
                "text": b.text,
                "num_tokens": b.num_tokens,
                "finish_reason": b.finish_reason,
            }
            for b in resp.branches
        ],
        "steps": resp.usage.steps,
        "num_tokens": resp.usage.completion_tokens,
        "latency_s": round(latency_s, 6),
        "prompt_tokens": resp.usage.prompt_tokens,
        "cached_tokens": resp.usage.cached_tokens,
        "finish_reason": resp.finish_reason,
        "replica_id": resp.replica_id,
    }


def _stream(stub: pb_grpc.AparServiceStub, msg: pb.GenerateRequest) -> pb.GenerateResponse:
    view = LiveView()
    call = stub.GenerateStream(msg)
    final = None
    try:
        for item in call:
            if item.HasField("final"):
                final = item.final
            for ev in item.events:
                view.update(ev.branch_id, ev.parent_id if ev.HasField("parent_id") else None, ev.delta_text)
            if item.events:
                view.draw()
    except KeyboardInterrupt:
        call.cancel()
        raise
    finally:
        view.clear()
    if final is None:
        raise RuntimeError("the stream ended without a final answer")
    return final


def run_remote_generate(args: argparse.Namespace) -> int:
    host, sep, port = str(args.server).rpartition(":")
    if not sep or not host or not port.isdigit():
        return fail(f"--server must be HOST:PORT, got {args.server!r}")
    live = sys.stderr.isatty() and not args.json
    try:
        req = build_request(args, stream=live)
        req.session_id = getattr(args, "session_id", None)
        req.validate()
    except AparError as exc:
        return fail(str(exc))
    msg = to_proto(req)
    start = time.monotonic()
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = pb_grpc.AparServiceStub(channel)
        try:
            resp = _stream(stub, msg) if live else stub.Generate(msg)
        except KeyboardInterrupt:
            return fail("interrupted; request cancelled", 130)
        except grpc.RpcError as exc:
            code, details = exc.code(), (exc.details() or "").replace("\n", " ")
            if code == grpc.StatusCode.UNAVAILABLE:
                return fail(f"server {args.server} unavailable: {details}", 1)
            return fail(f"{code.name}: {details}", 2 if code in _USER_ERRORS else 1)
        except RuntimeError as exc:
            return fail(str(exc), 1)
    if args.json:
        print(json.dumps(response_json(resp, time.monotonic() - start), ensure_ascii=False))
    else:
        print(resp.text)
    return 0
