"""How the gRPC proxy hands requests to AparIngress, and what an error may tell a client.

Ray Serve's gRPC proxy decodes a request with the deserializer its servicer function
registered; the generated ones raise on undecodable bytes (invalid UTF-8 in a `string`
field, garbage), which the client then sees as UNKNOWN "Unexpected DecodeError". The servicer
functions here register the same methods with no deserializer, so the ingress receives the raw
bytes and parses them itself (`parse`): undecodable or oversized input becomes a clean
INVALID_ARGUMENT / RESOURCE_EXHAUSTED. `client_message` keeps Ray's wrapping (tracebacks, pids,
addresses, actor ids, paths) out of every status message a client gets.

Streaming calls also go through `cancel_on_disconnect`: Ray's proxy cancels the replica's call
when a client leaves only if the proxy was awaiting the next item at that moment, not when it
was writing one (then the ingress, and the worker behind it, decode on to the end).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2  # noqa: F401 - reflection needs the descriptors here
from ray.exceptions import RayError, RayTaskError

from protos.apar.v1 import apar_pb2  # noqa: F401 - reflection needs the descriptors here

APAR_SERVICE = "apar.v1.AparService"
HEALTH_SERVICE = "grpc.health.v1.Health"
MAX_CLIENT_MESSAGE_CHARS = 300
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
M = TypeVar("M", bound=Message)


class BadWireData(ValueError):
    """The request bytes are not a valid message (maps to INVALID_ARGUMENT)."""


class RequestTooLarge(ValueError):
    """The request is over `limits.max_request_bytes` (maps to RESOURCE_EXHAUSTED)."""


def _register(server: Any, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
    """Both registration paths, like the generated add_*_to_server functions."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    add_registered = getattr(server, "add_registered_method_handlers", None)
    if add_registered is not None:  # grpcio >= 1.62
        add_registered(service, handlers)


_END = object()


def cancel_on_disconnect(handler: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[..., Any]:
    """The proxy's streaming handler, driven by a task of its own.

    The task is (almost) always awaiting the replica's next item, so when the client goes away
    and the gRPC server closes this generator, cancelling the task lands the CancelledError
    where Ray's proxy turns it into a cancel of the ingress call.
    """

    async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
        queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()  # unbounded: put never waits

        async def pump() -> None:
            try:
                async for message in handler(request, context):
                    queue.put_nowait((message, None))
                queue.put_nowait((_END, None))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # re-raised in the server's task
                queue.put_nowait((_END, exc))

        task = asyncio.create_task(pump())
        # The server may cancel this call while it writes a message and close this generator
        # only when it is collected: its end (a client cancel included) cancels the task too.
        add_done_callback = getattr(context, "add_done_callback", None)
        if add_done_callback is not None:
            add_done_callback(lambda _: task.cancel())
        try:
            while True:
                message, exc = await queue.get()
                if exc is not None:
                    raise exc
                if message is _END:
                    return
                yield message
        finally:
            task.cancel()  # a no-op once the call has ended

    return stream


def add_apar_service(servicer: Any, server: Any) -> None:
    """apar.v1.AparService with raw-bytes requests (Ray's proxy routes every call to the ingress)."""
    _register(
        server,
        APAR_SERVICE,
        {
            "Generate": grpc.unary_unary_rpc_method_handler(servicer.Generate),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                cancel_on_disconnect(servicer.GenerateStream)
            ),
            "Cancel": grpc.unary_unary_rpc_method_handler(servicer.Cancel),
        },
    )


def add_health_service(servicer: Any, server: Any) -> None:
    """grpc.health.v1.Health with raw-bytes requests."""
    _register(
        server,
        HEALTH_SERVICE,
        {
            "Check": grpc.unary_unary_rpc_method_handler(servicer.Check),
            "Watch": grpc.unary_stream_rpc_method_handler(cancel_on_disconnect(servicer.Watch)),
        },
    )


def parse(raw: bytes | M, cls: type[M], max_bytes: int) -> M:
    """The message from the bytes the proxy passed on (a message passes through as it is)."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise BadWireData(f"unexpected request type {type(raw).__name__}")
    if len(raw) > max_bytes:
        raise RequestTooLarge(f"request is {len(raw)} bytes; the limit is {max_bytes} bytes")
    try:
        return cls.FromString(bytes(raw))
    except (DecodeError, UnicodeDecodeError, ValueError):
        raise BadWireData(
            f"request is not a valid {cls.DESCRIPTOR.full_name} "
            "(undecodable protobuf, or a string field that is not UTF-8)"
        ) from None


def client_message(exc: BaseException) -> str:
    """The error's own first line, without what Ray wraps around an error from a replica.

    A `RayTaskError` reads "ray::Actor.method() (pid=..., ip=..., actor_id=...)" and a
    traceback; the error the replica raised is its `cause`.
    """
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if cause is None or isinstance(cause, RayError):
            return "the worker replica failed"
        exc = cause
    text = _ANSI.sub("", str(exc)).strip()
    line = text.splitlines()[0].strip() if text else ""
    if not line or not line.isprintable():
        line = "".join(c if c.isprintable() else " " for c in line).strip() or type(exc).__name__
    return line[:MAX_CLIENT_MESSAGE_CHARS]
