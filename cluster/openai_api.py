"""OpenAI-compatible HTTP: request JSON -> apar.v1 message, results -> OpenAI JSON shapes.

A request is turned into the same `pb.GenerateRequest` a gRPC client would send, so both APIs
share one validation path (`protocol.to_engine_request`), the router, failover and metrics.
APAR extensions (documented in the README): request fields `fork`, `max_branches`,
`max_depth`, `speculative` ("off", "ngram", "draft_heads"), `apar_events` (stream per-branch
events too); response `usage.steps`, `usage.branches`, `usage.draft_tokens`,
`usage.accepted_tokens`, and (non-streaming) `apar.branches`, the branch tree.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import grpc

from apar_worker.types import InvalidRequestError
from protos.apar.v1 import apar_pb2 as pb

# gRPC status of an ingress error -> (HTTP status, OpenAI error type)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}
_UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "best_of")


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, error type, offending parameter."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise bad("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def _typed(body: dict, key: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise bad(f"'{key}' must be {what}", key)
    if isinstance(value, float) and not math.isfinite(value):
        raise bad(f"'{key}' must be a finite number", key)
    return value


def _content(message: Any, i: int) -> pb.ChatMessage:
    if not isinstance(message, dict):
        raise bad(f"messages[{i}] must be an object", "messages")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad(f"messages[{i}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
    role = message.get("role")
    if role == "developer":
        role = "system"
    if not isinstance(role, str):
        raise bad(f"messages[{i}].role must be a string", "messages")
    return pb.ChatMessage(role=role, content=content)


def to_grpc_request(body: dict, model: str, chat: bool) -> tuple[pb.GenerateRequest, bool]:
    """(the apar.v1 request, stream?) of an OpenAI chat or completions body; raises ApiError."""
    name = body.get("model")
    if name is not None and name != model:
        raise ApiError(404, f"the model '{name}' does not exist; this server serves '{model}'",
                       "not_found_error", "model")  # fmt: skip
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, False, 0):
            raise bad(f"'{key}' is not supported by this server", key)
    n = _typed(body, "n", (int,), "an integer")
    if n not in (None, 1):
        raise bad("only n=1 is supported", "n")
    msg = pb.GenerateRequest()
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list", "messages")
        msg.messages.extend(_content(m, i) for i, m in enumerate(messages))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise bad("'prompt' must be a string (one prompt per request)", "prompt")
        msg.prompt = prompt
    max_tokens = _typed(body, "max_completion_tokens", (int,), "an integer")
    if max_tokens is None:
        max_tokens = _typed(body, "max_tokens", (int,), "an integer")
    if max_tokens is not None:
        msg.max_tokens = max_tokens
    _sampling(body, msg.sampling)
    for key in ("max_branches", "max_depth"):
        value = _typed(body, key, (int,), "an integer")
        if value is not None:
            setattr(msg, key, value)
    speculative = _typed(body, "speculative", (str,), "a string")
    if speculative:
        msg.speculative = speculative
    fork = _typed(body, "fork", (bool,), "a boolean")
    if fork is not None:
        msg.fork = fork
    user = _typed(body, "user", (str,), "a string")
    if user:
        msg.session_id = user[:128]
    stream = _typed(body, "stream", (bool,), "a boolean") or False
    msg.ordered = stream
    return msg, stream


def _sampling(body: dict, s: pb.SamplingParams) -> None:
    temperature = _typed(body, "temperature", (int, float), "a number")
    if temperature is not None:
        s.temperature = float(temperature)
    top_p = _typed(body, "top_p", (int, float), "a number")
    if top_p is not None:
        s.top_p = float(top_p)
    seed = _typed(body, "seed", (int,), "an integer")
    if seed is not None:
        s.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(x, str) for x in stop)):
        raise bad("'stop' must be a string or a list of strings", "stop")
    s.stop.extend(stop or [])


def from_invalid(exc: InvalidRequestError, message: str) -> ApiError:
    """A validation error of the shared path: 400 naming the field it starts with."""
    field = message.split(" ", 1)[0].split(":", 1)[0].split(".", 1)[0].split("[", 1)[0]
    return bad(message, field if field.isidentifier() else None)


def usage(resp: pb.GenerateResponse) -> dict:
    u = resp.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "steps": u.steps,  # APAR: engine steps the request took
        "branches": u.num_branches,  # APAR: branches of the answer (1 = sequential)
        "draft_tokens": u.draft_tokens,  # APAR: speculative drafts fed
        "accepted_tokens": u.accepted_tokens,  # APAR: ... of which accepted
    }


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def completion(resp: pb.GenerateResponse, model: str, chat: bool, created: int | None = None) -> dict:
    """The non-streaming response, with the branch tree as the `apar` extension."""
    created = created or int(time.time())
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": resp.text},
                  "finish_reason": _finish(resp.finish_reason), "logprobs": None}  # fmt: skip
    else:
        choice = {
            "index": 0,
            "text": resp.text,
            "finish_reason": _finish(resp.finish_reason),
            "logprobs": None,
        }
    branches = [
        {
            "id": b.id,
            "parent": b.parent_id if b.HasField("parent_id") else None,
            "text": b.text,
            "num_tokens": b.num_tokens,
            "finish_reason": b.finish_reason,
        }  # fmt: skip
        for b in resp.branches
    ]
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + resp.request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(resp),
        "apar": {"branches": branches, "replica_ids": list(resp.replica_ids)},
    }


def chunk(rid: str, model: str, chat: bool, created: int, text: str | None, finish: str | None = None,
          events: list[dict] | None = None, first: bool = False) -> dict:  # fmt: skip
    """One streamed chunk: a text delta in reading order (and, if asked, the step's branch events)."""
    if chat:
        delta: dict = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    out = {"id": ("chatcmpl-" if chat else "cmpl-") + rid, "created": created, "model": model,
           "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}  # fmt: skip
    if events is not None:
        out["apar"] = {"events": events}
    return out


def event_json(ev: pb.BranchEvent) -> dict:
    return {
        "branch_id": ev.branch_id,
        "parent_id": ev.parent_id if ev.HasField("parent_id") else None,
        "delta_text": ev.delta_text,
        "created": ev.created,
        "finish_reason": ev.finish_reason or None,
    }


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def models(model: str) -> dict:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": 0, "owned_by": "apar-serve"}],
    }
