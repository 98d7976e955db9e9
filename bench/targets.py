"""Load targets: one call = one request, measured from the client side (TTFT, e2e, tokens).

Our cluster over gRPC (streamed or unary) or its OpenAI HTTP endpoint, our engine in-process (the
cluster's cost left out) and vLLM-CPU / llama.cpp over their OpenAI HTTP APIs; each returns a Result and never raises for a failed request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from bench.common import Prompt, check_loopback


@dataclass
class Result:
    ok: bool
    start: float  # perf_counter at send
    ttft_s: float | None
    e2e_s: float
    tokens: int
    kind: str
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1)


class GrpcTarget:
    """GenerateStream over one shared channel; TTFT = first event that carries a token."""

    def __init__(
        self, address: str, fork: bool, timeout_s: float, unary: bool = False, speculative: str = ""
    ):
        import grpc

        from protos.apar.v1 import apar_pb2_grpc as pb_grpc

        check_loopback(address)
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.AparServiceStub(self.channel)
        self.fork, self.timeout_s, self.unary = fork, timeout_s, unary
        self.speculative = speculative  # the request's own choice ("": the deployment's)

    def _unary(self, msg, prompt: Prompt) -> Result:
        """Generate (no per-step events); TTFT is the replica's own figure, network not included."""
        start = time.perf_counter()
        resp = self.stub.Generate(msg, timeout=self.timeout_s)
        e2e = time.perf_counter() - start
        return Result(
            True, start, resp.timings.ttft_s or None, e2e, resp.usage.completion_tokens, prompt.kind
        )

    def __call__(self, prompt: Prompt, max_tokens: int) -> Result:
        import grpc

        from protos.apar.v1 import apar_pb2 as pb

        msg = pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content=prompt.text)],
            max_tokens=max_tokens,
            fork=self.fork,
            speculative=self.speculative,
        )
        start = time.perf_counter()
        ttft = None
        try:
            if self.unary:
                return self._unary(msg, prompt)
            for item in self.stub.GenerateStream(msg, timeout=self.timeout_s):
                if item.HasField("final"):
                    tokens = item.final.usage.completion_tokens
                    return Result(True, start, ttft, time.perf_counter() - start, tokens, prompt.kind)
                if ttft is None and any(e.num_new_tokens > 0 for e in item.events):
                    ttft = time.perf_counter() - start
            return Result(False, start, ttft, time.perf_counter() - start, 0, prompt.kind, "no final answer")
        except grpc.RpcError as exc:
            err = f"{exc.code().name}: {exc.details()}"
            return Result(False, start, ttft, time.perf_counter() - start, 0, prompt.kind, err)

    def close(self) -> None:
        self.channel.close()


class CompletionsTarget:
    """Streamed /v1/completions (vLLM, llama-server) with the same prompt token ids our engine decodes."""

    def __init__(self, port: int, tokenizer, timeout_s: float):
        self.port, self.tokenizer, self.timeout_s = port, tokenizer, timeout_s

    def __call__(self, prompt: Prompt, max_tokens: int) -> Result:
        from bench.vllm_peer import complete

        ids = chat_ids(self.tokenizer, prompt)
        start = time.perf_counter()
        try:
            c = complete(self.port, ids, max_tokens, stream=True, timeout_s=self.timeout_s)
            return Result(True, start, c.ttft_s, time.perf_counter() - start, c.tokens, prompt.kind)
        except Exception as exc:  # a failed request is a data point, not a crash
            return Result(False, start, None, time.perf_counter() - start, 0, prompt.kind, str(exc)[:200])

    def close(self) -> None:
        pass


class HttpTarget:
    """Our cluster's OpenAI endpoint: streamed /v1/chat/completions (reading order), fork on/off."""

    def __init__(self, address: str, fork: bool, timeout_s: float):
        check_loopback(address)
        self.port = int(address.rsplit(":", 1)[1])
        self.fork, self.timeout_s = fork, timeout_s

    def __call__(self, prompt: Prompt, max_tokens: int) -> Result:
        from bench.openai_peer import post

        body = {
            "messages": prompt.messages(), "max_tokens": max_tokens, "fork": self.fork,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        start = time.perf_counter()
        try:
            c = post(self.port, "/v1/chat/completions", body, self.timeout_s)
            return Result(True, start, c.ttft_s, time.perf_counter() - start, c.tokens, prompt.kind)
        except Exception as exc:  # a failed request is a data point, not a crash
            return Result(False, start, None, time.perf_counter() - start, 0, prompt.kind, str(exc)[:200])

    def close(self) -> None:
        pass


class EngineTarget:
    """Our engine in this process (AsyncEngine on its own event loop): the cluster's cost left out."""

    def __init__(
        self, model: str, fork: bool, timeout_s: float, threads: int = 1, quantization: str | None = None
    ):
        import asyncio

        import torch

        from apar_worker.async_engine import AsyncEngine
        from apar_worker.engine import EngineConfig

        torch.set_num_threads(threads)  # as in a worker replica (Ray gives an n-CPU actor n threads)
        cfg = EngineConfig(
            model=model, device="cpu", kv_cache_memory_mb=128, max_num_seqs=128, quantization=quantization
        )
        self.fork, self.timeout_s = fork, timeout_s
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="bench-engine-loop").start()
        self.engine = asyncio.run_coroutine_threadsafe(self._make(cfg, AsyncEngine), self.loop).result()

    @staticmethod
    async def _make(cfg, cls):
        return cls(cfg)

    async def _one(self, prompt: Prompt, max_tokens: int) -> Result:
        from apar_worker.types import GenerateRequest, RequestOutput, SamplingParams

        req = GenerateRequest(
            messages=prompt.messages(), fork=self.fork, sampling=SamplingParams(max_tokens=max_tokens)
        )
        start, ttft = time.perf_counter(), None
        async for item in self.engine.generate(req):
            if isinstance(item, RequestOutput):
                ok = item.error is None
                return Result(
                    ok,
                    start,
                    ttft,
                    time.perf_counter() - start,
                    item.num_tokens,
                    prompt.kind,
                    item.error or "",
                )
            if ttft is None and item.new_token_ids:
                ttft = time.perf_counter() - start
        return Result(False, start, ttft, time.perf_counter() - start, 0, prompt.kind, "no output")

    def __call__(self, prompt: Prompt, max_tokens: int) -> Result:
        import asyncio

        fut = asyncio.run_coroutine_threadsafe(self._one(prompt, max_tokens), self.loop)
        return fut.result(timeout=self.timeout_s)

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.engine.shutdown(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def chat_ids(tokenizer, prompt: Prompt) -> list[int]:
    """Exactly what apar_worker.Engine.tokenize does for a messages request."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(prompt.messages(), add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt.text)
