"""AparIngress: the gRPC-facing deployment behind Ray Serve's gRPC proxy.

Ray's proxy calls a method of this class by the gRPC method's name (`/apar.v1.AparService/
Generate` -> `Generate`, `/grpc.health.v1.Health/Check` -> `Check`); server reflection is served
by the proxy itself (`gRPCOptions.enable_reflection`). The ingress validates requests (bad input
never reaches a worker), streams a worker's items back as gRPC messages, maps finish reasons to
gRPC status codes, and retries a request on another replica if its replica dies mid-generation,
forwarding only the events the client has not seen yet (`cluster.resume`; decoding is
deterministic: greedy, or seeded by `protocol.to_engine_request`).

No `from __future__ import annotations` here: Ray Serve re-creates the FastAPI route functions
in its own module, where string annotations (`request: "Request"`) would not resolve.
"""

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from apar_worker.reading_order import ReadingOrder
from apar_worker.types import (
    BranchEvent,
    GenerateRequest,
    InvalidRequestError,
    RequestOutput,
    ResumedBranch,
)
from cluster.cancel_bus import CancelBus
from cluster.config import INGRESS_DEPLOYMENT, load_config_dict
from cluster.grpc_service import BadWireData, RequestTooLarge, client_message, parse
from cluster.http_routes import http_generate
from cluster.openai_api import models
from cluster.protocol import RequestIdInUse, to_engine_request, to_event, to_response
from cluster.resume import ReplayMismatchError, generate_with_failover
from cluster.state import state_from_config
from protos.apar.v1 import apar_pb2 as pb

log = logging.getLogger("ray.serve")
SERVICE_NAME = "apar.v1.AparService"
MAX_ATTEMPTS = 3  # one try plus two retries on other replicas if a replica dies
M = TypeVar("M", bound=Message)


class GrpcError(Exception):
    """Ends a call with a gRPC status code and a message for the client."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(code, message)  # both in args: Ray pickles it back to the proxy
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


def _status_of(out: RequestOutput, req: GenerateRequest, timeout_s: float) -> GrpcError | None:
    """Non-OK finish reasons become gRPC errors; `stop`/`length` are successes."""
    if out.finish_reason == "deadline":
        return GrpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"request {req.request_id} exceeded timeout_s={timeout_s:g} after {out.num_tokens} tokens",
        )
    if out.finish_reason == "cancelled":
        return GrpcError(grpc.StatusCode.CANCELLED, f"request {req.request_id} was cancelled")
    if out.finish_reason == "error":
        log.error("request %s failed on its replica: %s", req.request_id, out.error)
        return _internal(req.request_id)
    return None


def _internal(request_id: str) -> GrpcError:
    """What a client learns of a server fault: that it happened, and the id to find it in the logs."""
    return GrpcError(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")


def _set(ctx: RayServegRPCContext, err: GrpcError) -> None:
    ctx.set_code(err.code)
    ctx.set_details(err.message)


http_app = FastAPI(title="APAR Serve", docs_url=None, redoc_url=None)
LIVE_PAGE = Path(__file__).resolve().parent / "static" / "index.html"


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(http_app)
class AparIngress:
    """apar.v1.AparService and grpc.health.v1.Health through Ray Serve's gRPC proxy, and the
    OpenAI-compatible HTTP API through its HTTP proxy: one router, failover and metrics."""

    def __init__(self, worker: DeploymentHandle, config: dict[str, Any]):
        self.cfg = load_config_dict(config)
        self.worker = worker
        self._inflight: dict[str, DeploymentResponseGenerator] = {}
        self._cancelled: set[str] = set()
        self.state = state_from_config(dataclasses.asdict(self.cfg.redis))  # None without Redis
        self._loop = asyncio.get_event_loop()  # the replica's loop: cancels from the bus run on it
        self.bus = None
        if self.state is not None:  # a Cancel RPC on another ingress replica reaches us here
            self.bus = CancelBus(self.state.url, self.state.namespace, self._cancel_from_bus).start()

    # -- core ----------------------------------------------------------------------------------
    async def _run(
        self, req: GenerateRequest, timeout_s: float
    ) -> AsyncIterator[tuple[list[str], list[BranchEvent | RequestOutput]]]:
        """(replica ids, items) pairs of one request, a list per engine step (the last one ends
        with the RequestOutput); raises GrpcError on failure. The replica ids are every replica
        that ran the request so far, the current one last.

        A replica that dies mid-request is marked dead and the request resumes (or, with
        `ingress.resume: false`, is replayed) on another one; `cluster.resume` forwards only the
        events the client has not seen yet.
        """
        # Over 50 lines on purpose: one try maps every failure of the stream to exactly one
        # gRPC status, and its finally always releases the in-flight entry.
        rid = req.request_id
        if rid in self._inflight:
            raise GrpcError(grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is already in flight")

        deadline = time.monotonic() + timeout_s if timeout_s > 0 else None

        def start(attempt: int, tree: list[ResumedBranch] | None) -> DeploymentResponseGenerator:
            # a retry gets what is left of the request's timeout, not a fresh one
            left = max(0.001, deadline - time.monotonic()) if deadline is not None else 0.0
            attempt_req = dataclasses.replace(req, resume=tree) if tree else req
            # token events even for unary calls, so a failover can resume from them
            gen = self.worker.options(stream=True).generate.remote(
                attempt_req, left, events=self.cfg.ingress.resume
            )
            self._inflight[rid] = gen
            return gen

        ran: list[str] = []
        try:
            async for item in generate_with_failover(
                start,
                request_id=rid,
                state=self.state,
                max_attempts=MAX_ATTEMPTS,
                resume=self.cfg.ingress.resume,
            ):
                if isinstance(item, str):
                    ran.append(item)
                else:
                    yield list(ran), item
        except RequestCancelledError:
            raise GrpcError(grpc.StatusCode.CANCELLED, f"request {rid} was cancelled") from None
        # Errors from a replica arrive wrapped in Ray's traceback: only their own message is sent.
        except RequestIdInUse as exc:  # on its worker replica, from another ingress replica
            raise GrpcError(grpc.StatusCode.ALREADY_EXISTS, client_message(exc)) from None
        except InvalidRequestError as exc:  # the engine's own checks, e.g. prompt over max_model_len
            raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, client_message(exc)) from None
        except BackPressureError as exc:
            raise GrpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, client_message(exc)) from None
        except ReplayMismatchError as exc:
            raise GrpcError(grpc.StatusCode.ABORTED, f"request {rid}: {exc}") from None
        except (RayActorError, DeploymentUnavailableError) as exc:
            if rid in self._cancelled:
                raise GrpcError(grpc.StatusCode.CANCELLED, f"request {rid} was cancelled") from None
            log.warning("request %s: no worker replica could finish it: %s", rid, exc)
            raise GrpcError(
                grpc.StatusCode.UNAVAILABLE, f"no worker replica could finish request {rid}"
            ) from None
        finally:
            gen = self._inflight.pop(rid, None)
            self._cancelled.discard(rid)
            if gen is not None:
                gen.cancel()  # no-op once finished; aborts the engine request otherwise

    def _parse(self, raw: bytes | M, cls: type[M]) -> M:
        """The proxy passes the request's bytes (cluster.grpc_service): decode them here."""
        try:
            return parse(raw, cls, self.cfg.limits.max_request_bytes)
        except BadWireData as exc:
            raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except RequestTooLarge as exc:
            raise GrpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None

    def _validated(self, msg: pb.GenerateRequest, stream: bool) -> GenerateRequest:
        try:
            return to_engine_request(msg, self.cfg.limits, stream=stream)
        except InvalidRequestError as exc:
            raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, client_message(exc)) from None

    async def unary(self, msg: pb.GenerateRequest) -> pb.GenerateResponse:
        """The whole answer of one request; raises GrpcError (shared by gRPC and HTTP)."""
        req = self._validated(msg, stream=False)
        async with contextlib.aclosing(self._run(req, msg.timeout_s)) as run:
            async for replicas, items in run:
                if isinstance(items[-1], RequestOutput):
                    err = _status_of(items[-1], req, msg.timeout_s)
                    if err is not None:
                        raise err
                    return to_response(items[-1], replicas)
        raise GrpcError(grpc.StatusCode.INTERNAL, "no result")

    async def stream(self, msg: pb.GenerateRequest) -> AsyncIterator[pb.GenerateStreamResponse]:
        """One message per engine step with that step's events, then one with the final answer;
        with `msg.ordered`, each also carries the reading-order delta. Raises GrpcError."""
        req = self._validated(msg, stream=True)
        rid = req.request_id
        order = ReadingOrder() if msg.ordered else None
        # aclosing: when the client goes away while this generator is suspended at a
        # yield, _run is closed now (cancelling the worker call), not at garbage collection.
        async with contextlib.aclosing(self._run(req, msg.timeout_s)) as run:
            async for replicas, items in run:
                evs = [e for e in items if isinstance(e, BranchEvent)]
                if evs:
                    delta = "".join(order.feed(e) for e in evs) if order else ""
                    events = [to_event(e, replicas[-1]) for e in evs]
                    yield pb.GenerateStreamResponse(request_id=rid, events=events, ordered_delta=delta)
                if not isinstance(items[-1], RequestOutput):
                    continue
                err = _status_of(items[-1], req, msg.timeout_s)
                if err is not None:
                    raise err
                final = to_response(items[-1], replicas)
                rest = order.finish(final.text) if order else ""
                yield pb.GenerateStreamResponse(request_id=rid, final=final, ordered_delta=rest)

    # -- apar.v1.AparService -------------------------------------------------------------------
    async def Generate(
        self, request: bytes | pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> pb.GenerateResponse:
        rid = ""
        try:
            msg = self._parse(request, pb.GenerateRequest)
            rid = msg.request_id
            return await self.unary(msg)
        except GrpcError as err:
            _set(grpc_context, err)
        except Exception:  # never a traceback to the client: log it, send the request id
            rid = rid or uuid.uuid4().hex
            log.exception("request %s: Generate failed", rid)
            _set(grpc_context, _internal(rid))
        return pb.GenerateResponse()

    async def GenerateStream(
        self, request: bytes | pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        rid = ""
        try:
            msg = self._parse(request, pb.GenerateRequest)
            rid = msg.request_id
            async with contextlib.aclosing(self.stream(msg)) as messages:
                async for out in messages:
                    yield out
        except GrpcError as err:
            # A stream carries the context to the proxy only with a message or an exception;
            # raising after set_code makes Ray Serve keep our code and details.
            _set(grpc_context, err)
            raise
        except Exception:  # never a traceback to the client: log it, send the request id
            rid = rid or uuid.uuid4().hex
            log.exception("request %s: GenerateStream failed", rid)
            err = _internal(rid)
            _set(grpc_context, err)
            raise err from None

    # -- OpenAI-compatible HTTP (cluster.http_routes) -------------------------------------------
    @http_app.get("/")
    async def http_page(self) -> HTMLResponse:
        """The live view: type a prompt, watch the branches fill in (uses the HTTP API)."""
        return HTMLResponse(LIVE_PAGE.read_text(encoding="utf-8"))

    @http_app.get("/v1/models")
    async def http_models(self) -> JSONResponse:
        return JSONResponse(models(self.cfg.model))

    @http_app.get("/health")
    async def http_health(self) -> JSONResponse:
        ok = await self._health("") == health_pb2.HealthCheckResponse.SERVING
        return JSONResponse({"status": "ok" if ok else "no worker replica"}, status_code=200 if ok else 503)

    @http_app.post("/v1/chat/completions")
    async def http_chat(self, request: Request) -> Response:
        return await http_generate(self, await request.body(), chat=True)

    @http_app.post("/v1/completions")
    async def http_completions(self, request: Request) -> Response:
        return await http_generate(self, await request.body(), chat=False)

    async def Cancel(
        self, request: bytes | pb.CancelRequest, grpc_context: RayServegRPCContext
    ) -> pb.CancelResponse:
        """Cancels a request by the request_id the client chose, on whichever ingress replica
        serves it (cluster/cancel_bus.py)."""
        try:
            request = self._parse(request, pb.CancelRequest)
        except GrpcError as err:
            _set(grpc_context, err)
            return pb.CancelResponse()
        if not request.request_id:
            _set(grpc_context, GrpcError(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required"))
            return pb.CancelResponse()
        rid = request.request_id
        if self._cancel_local(rid):
            return pb.CancelResponse(cancelled=True)
        if self.bus is None or not await asyncio.to_thread(self.state.owner, rid):
            return pb.CancelResponse(cancelled=False)  # not running anywhere (or no Redis to ask)
        return pb.CancelResponse(cancelled=await asyncio.to_thread(self.bus.publish, rid))

    def _cancel_from_bus(self, rid: str) -> bool:
        """On the bus's thread: cancel on the replica's loop, and say whether we held it."""

        async def cancel() -> bool:
            return self._cancel_local(rid)

        try:
            return asyncio.run_coroutine_threadsafe(cancel(), self._loop).result(timeout=5)
        except Exception:  # the loop is gone or stuck: nothing was cancelled here
            return False

    def _cancel_local(self, rid: str) -> bool:
        gen = self._inflight.get(rid)
        if gen is None:
            return False
        self._cancelled.add(rid)
        gen.cancel()
        return True

    # -- grpc.health.v1.Health -----------------------------------------------------------------
    async def _health(self, service: str) -> int:
        if service not in ("", SERVICE_NAME):
            return -1
        try:
            await asyncio.wait_for(self.worker.ping.remote(), timeout=5.0)
            return health_pb2.HealthCheckResponse.SERVING
        except Exception:
            return health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(
        self, request: bytes | health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> health_pb2.HealthCheckResponse:
        """SERVING when a worker replica answers; the proxy's own health is /ray.serve...Healthz."""
        try:
            request = self._parse(request, health_pb2.HealthCheckRequest)
        except GrpcError as err:
            _set(grpc_context, err)
            return health_pb2.HealthCheckResponse()
        status = await self._health(request.service)
        if status < 0:
            _set(grpc_context, GrpcError(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}"))
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: bytes | health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """Sends the status now and again whenever it changes (checked every 2 s)."""
        try:
            request = self._parse(request, health_pb2.HealthCheckRequest)
        except GrpcError as err:
            _set(grpc_context, err)
            raise
        last = None
        while True:
            status = await self._health(request.service)
            if status < 0:
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(2.0)
