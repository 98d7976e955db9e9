"""The OpenAI-compatible completions endpoints on top of the ingress's shared request path.

`http_generate` turns an OpenAI body into an apar.v1 request (`openai_api`), runs it through
the same `AparIngress.unary` / `.stream` as gRPC (validation, routing, failover, metrics), and
answers in OpenAI's shapes: JSON, or server-sent events of reading-order text deltas, with
errors as OpenAI's error JSON and the matching HTTP status.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.openai_api import (
    HTTP_STATUS,
    ApiError,
    chunk,
    completion,
    event_json,
    parse_body,
    sse,
    to_grpc_request,
    usage,
)

log = logging.getLogger("ray.serve")


def _api_error(err: Any) -> ApiError:
    """An ingress GrpcError as an OpenAI error (its message is already clean)."""
    status, type_ = HTTP_STATUS.get(err.code, (500, "internal_error"))
    return ApiError(status, err.message, type_)


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def http_generate(ingress: Any, raw: bytes, chat: bool) -> Response:
    from cluster.ingress import GrpcError

    model = ingress.cfg.model
    try:
        body = parse_body(raw)
        msg, stream = to_grpc_request(body, model, chat)
        msg.request_id = uuid.uuid4().hex
        if stream:
            ingress._validated(msg, stream=True)  # bad input is a 400, not a broken stream
            opts = body.get("stream_options") or {}
            include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            events = body.get("apar_events") is True
            gen = _sse(ingress, msg, model, chat, include_usage, events)
            return StreamingResponse(gen, media_type="text/event-stream")
        resp = await ingress.unary(msg)
        return JSONResponse(completion(resp, model, chat))
    except ApiError as err:
        return _error_response(err)
    except GrpcError as err:
        return _error_response(_api_error(err))
    except Exception:  # never a traceback to the client
        log.exception("HTTP request failed")
        return _error_response(ApiError(500, "internal error", "internal_error"))


async def _sse(
    ingress: Any, msg: Any, model: str, chat: bool, include_usage: bool, events: bool
) -> AsyncIterator[bytes]:
    """Chunks of reading-order text (and, with apar_events, each step's branch events)."""
    from cluster.ingress import GrpcError

    created, rid, first = int(time.time()), msg.request_id, True
    try:
        async with contextlib.aclosing(ingress.stream(msg)) as messages:
            async for out in messages:
                evs = [event_json(e) for e in out.events] if events else None
                if out.HasField("final"):
                    final = out.final
                    if out.ordered_delta or evs:
                        yield sse(chunk(rid, model, chat, created, out.ordered_delta, None, evs, first))
                        first = False
                    reason = "length" if final.finish_reason == "length" else "stop"
                    yield sse(chunk(rid, model, chat, created, None, reason, None, first))
                    if include_usage:
                        tail = chunk(rid, model, chat, created, None)
                        tail["choices"], tail["usage"] = [], usage(final)
                        yield sse(tail)
                    continue
                if out.ordered_delta or evs:
                    yield sse(chunk(rid, model, chat, created, out.ordered_delta, None, evs, first))
                    first = False
    except GrpcError as err:  # mid-stream: the status line is gone, so the error is an event
        yield sse(_api_error(err).body())
    except Exception:
        log.exception("request %s: HTTP stream failed", rid)
        yield sse(ApiError(500, f"internal error (request id {rid})", "internal_error").body())
    yield sse("[DONE]")
