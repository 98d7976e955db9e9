"""Conversion between the gRPC messages (apar.v1) and the engine's request/response types.

Validation lives here, before anything reaches a worker, so bad input costs no KV blocks and
every error carries a message that names the offending field (gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
import random
import uuid

from apar_worker.types import (
    BranchEvent,
    GenerateRequest,
    InvalidRequestError,
    RequestOutput,
    SamplingParams,
)
from cluster.config import LimitsSection
from protos.apar.v1 import apar_pb2 as pb

_ROLES = ("system", "user", "assistant")
_MAX_ID_CHARS = 128
_MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # per stop string: the engine searches the text's tail for every one each token
_MAX_DEPTH = 8
# The sampler divides logits by the temperature and the repetition penalty in float32: past
# these bounds a logit overflows to inf, the probabilities become NaN and the engine step fails.
_MIN_TEMPERATURE = 1e-6  # a positive temperature below it; 0 is greedy
_PENALTY_RANGE = (1e-6, 1e6)


class RequestIdInUse(InvalidRequestError):
    """A worker replica already runs a request with this request_id (gRPC ALREADY_EXISTS)."""


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError(message)


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise _bad(f"{name} must be a finite number, got {value}")
    return value


def _sampling(msg: pb.GenerateRequest, max_tokens: int) -> SamplingParams:
    s = msg.sampling
    params = SamplingParams(max_tokens=max_tokens)
    if s.HasField("temperature"):
        params.temperature = _finite("sampling.temperature", s.temperature)
        if 0 < params.temperature < _MIN_TEMPERATURE:
            raise _bad(
                f"sampling.temperature must be 0 (greedy) or at least {_MIN_TEMPERATURE:g}, got {s.temperature:g}"
            )
    if s.HasField("top_k"):
        params.top_k = s.top_k
    if s.HasField("top_p"):
        params.top_p = _finite("sampling.top_p", s.top_p)
    if s.HasField("repetition_penalty"):
        params.repetition_penalty = _finite("sampling.repetition_penalty", s.repetition_penalty)
        low, high = _PENALTY_RANGE
        if params.repetition_penalty > 0 and not low <= params.repetition_penalty <= high:
            raise _bad(
                f"sampling.repetition_penalty must be in [{low:g}, {high:g}], got {s.repetition_penalty:g}"
            )
    if s.HasField("seed"):
        params.seed = s.seed
    elif params.temperature > 0:
        # A fixed seed makes a retried request (after its replica died) decode the same text.
        params.seed = random.getrandbits(31)
    if len(s.stop) > _MAX_STOP_STRINGS:
        raise _bad(f"sampling.stop: at most {_MAX_STOP_STRINGS} stop strings, got {len(s.stop)}")
    for i, stop in enumerate(s.stop):
        if len(stop) > MAX_STOP_CHARS:
            raise _bad(f"sampling.stop[{i}]: at most {MAX_STOP_CHARS} characters, got {len(stop)}")
    params.stop = list(s.stop)
    params.ignore_eos = s.ignore_eos
    return params


def to_engine_request(msg: pb.GenerateRequest, limits: LimitsSection, stream: bool) -> GenerateRequest:
    """Validate a gRPC request against the server limits; raises InvalidRequestError."""
    if msg.prompt and msg.messages:
        raise _bad("set either prompt or messages, not both")
    if not msg.prompt and not msg.messages:
        raise _bad("prompt or messages is required")
    messages = None
    if msg.messages:
        messages = []
        for i, m in enumerate(msg.messages):
            if m.role not in _ROLES:
                raise _bad(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {m.role!r}")
            messages.append({"role": m.role, "content": m.content})
        size = sum(len(m.content) for m in msg.messages)
    else:
        size = len(msg.prompt)
    if size > limits.max_prompt_chars:
        raise _bad(f"prompt too long: {size} characters, the limit is {limits.max_prompt_chars}")
    max_tokens = msg.max_tokens if msg.HasField("max_tokens") else limits.default_max_tokens
    if max_tokens <= 0:
        raise _bad(f"max_tokens must be a positive integer, got {max_tokens}")
    if max_tokens > limits.max_tokens:
        raise _bad(f"max_tokens {max_tokens} is over the server limit {limits.max_tokens}")
    if msg.HasField("max_branches") and not 1 <= msg.max_branches <= limits.max_branches:
        raise _bad(f"max_branches must be in [1, {limits.max_branches}], got {msg.max_branches}")
    if msg.HasField("max_depth") and not 0 <= msg.max_depth <= _MAX_DEPTH:
        raise _bad(f"max_depth must be in [0, {_MAX_DEPTH}], got {msg.max_depth}")
    timeout_s = _finite("timeout_s", msg.timeout_s)
    if not 0 <= timeout_s <= limits.max_timeout_s:
        raise _bad(f"timeout_s must be in [0, {limits.max_timeout_s}] seconds, got {timeout_s}")
    for name in ("request_id", "session_id"):
        value = getattr(msg, name)
        if len(value) > _MAX_ID_CHARS or not value.isprintable():
            raise _bad(f"{name} must be at most {_MAX_ID_CHARS} printable characters")
    req = GenerateRequest(
        prompt=msg.prompt or None,
        messages=messages,
        sampling=_sampling(msg, max_tokens),
        fork=msg.fork if msg.HasField("fork") else True,
        request_id=msg.request_id or uuid.uuid4().hex,
        stream=stream,
        session_id=msg.session_id or None,
        speculative=msg.speculative or None,
    )
    if msg.HasField("max_branches"):
        req.max_branches = msg.max_branches
    if msg.HasField("max_depth"):
        req.max_depth = msg.max_depth
    req.validate()  # the engine's own checks (empty prompt, sampling ranges, ...)
    return req


def to_response(out: RequestOutput, replica_ids: list[str]) -> pb.GenerateResponse:
    """`replica_ids`: every replica that ran the request (more than one after a failover), the
    one that produced `out` last."""
    branches = []
    for b in out.branches:
        branch = pb.Branch(id=b.id, text=b.text, num_tokens=b.num_tokens, finish_reason=b.finish_reason or "")
        if b.parent is not None:
            branch.parent_id = b.parent
        if b.fork_position is not None:
            branch.fork_position = b.fork_position
        branches.append(branch)
    return pb.GenerateResponse(
        request_id=out.request_id,
        text=out.text,
        branches=branches,
        finish_reason=out.finish_reason,
        usage=pb.Usage(
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.num_tokens,
            cached_tokens=out.cached_tokens,
            num_branches=len(out.branches),
            steps=out.steps,
            num_preemptions=out.num_preemptions,
            draft_tokens=sum(b.spec_drafted for b in out.branches),
            accepted_tokens=sum(b.spec_accepted for b in out.branches),
        ),
        timings=pb.Timings(ttft_s=out.ttft_s or 0.0, latency_s=out.latency_s),
        replica_id=replica_ids[-1] if replica_ids else "",
        replica_ids=replica_ids,
    )


def to_event(ev: BranchEvent, replica_id: str, delta_text: str | None = None) -> pb.BranchEvent:
    msg = pb.BranchEvent(
        branch_id=ev.branch_id,
        delta_text=ev.delta_text if delta_text is None else delta_text,
        created=ev.created,
        finish_reason=ev.finish_reason or "",
        num_new_tokens=len(ev.new_token_ids),
        replica_id=replica_id,
    )
    if ev.parent_id is not None:
        msg.parent_id = ev.parent_id
    return msg
