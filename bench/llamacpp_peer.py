"""The llama.cpp peer: `llama-server` on loopback serving the base model's own GGUF.

`scripts/install-llamacpp.sh` builds it into .llamacpp/ (ignored). Two weight files are compared:
the Q4_1 GGUF the base is packaged as (what a llama.cpp user runs; 4-bit weights, so its greedy
text differs from ours) and an F32 GGUF converted from the same prepared weights our engine loads
(the like-for-like pair). Prompts go in as the same token ids our engine decodes, greedy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from apar_worker.omp import user_env
from bench.common import ROOT, BenchError
from bench.openai_peer import Completion, PeerServer, post

Q4, F32 = "q4_1", "f32"


def llamacpp_dir() -> Path:
    """Where scripts/install-llamacpp.sh built llama.cpp ($APAR_LLAMACPP_DIR overrides)."""
    return Path(os.environ.get("APAR_LLAMACPP_DIR") or ROOT / ".llamacpp")


def skip_reason() -> str | None:
    if not (llamacpp_dir() / "bin" / "llama-server").is_file():
        return f"llama.cpp not built in {llamacpp_dir()} (run scripts/install-llamacpp.sh); llama.cpp rows skipped"
    return None


def gguf_file(base: str, weights: str) -> Path:
    """The base's packaged GGUF (q4_1), or an F32 GGUF of its prepared weights, made once."""
    from apar_worker.base_models import apar_home, build_atomically, ensure_base, get_base, package_file

    if weights == Q4:
        return package_file(get_base(base))
    out_dir = apar_home() / "gguf" / f"{base}-f32"
    out = out_dir / "model.gguf"
    if out.is_file():
        return out
    src = ensure_base(base)

    def build(tmp: Path) -> None:
        cmd = [sys.executable, str(llamacpp_dir() / "convert_hf_to_gguf.py"), str(src), "--outtype", "f32",
               "--outfile", str(tmp / "model.gguf")]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(llamacpp_dir() / "gguf-py")}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            raise BenchError(f"converting {base} to an F32 GGUF failed: {done.stderr.strip()[-300:]}")

    build_atomically(out_dir, build, f"F32 GGUF of {base}", progress=True)
    return out


class LlamaServer(PeerServer):
    """`llama-server -m GGUF` on 127.0.0.1 with `parallel` slots sharing one context."""

    name = "llama-server"

    def __init__(
        self, gguf: Path, port: int, log_path: Path, ctx_per_slot: int, threads: int = 1, parallel: int = 1
    ) -> None:
        super().__init__(port, log_path, startup_timeout_s=120.0)
        self.gguf, self.ctx_per_slot, self.threads, self.parallel = gguf, ctx_per_slot, threads, parallel

    def command(self) -> tuple[list[str], dict[str, str]]:
        binary = llamacpp_dir() / "bin" / "llama-server"
        if not binary.is_file():
            raise BenchError(skip_reason() or "llama.cpp missing")
        cmd = [
            str(binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
            "-t", str(self.threads), "-tb", str(self.threads), "-np", str(self.parallel),
            "-c", str(self.ctx_per_slot * self.parallel), "--no-webui", "--seed", "0",
        ]  # fmt: skip
        return cmd + os.environ.get("APAR_LLAMACPP_ARGS", "").split(), user_env()

    def generate(self, prompt_ids: list[int], max_tokens: int, timeout_s: float = 300) -> Completion:
        """Greedy, whole answer, with its token ids (llama.cpp's native /completion endpoint)."""
        body: dict[str, Any] = {
            "prompt": prompt_ids, "n_predict": max_tokens, "temperature": 0.0, "top_k": 1,
            "return_tokens": True, "cache_prompt": False, "stream": False,
        }  # fmt: skip
        return post(self.port, "/completion", body, timeout_s)


def same_prefix_share(ours: list[int], theirs: list[int]) -> float:
    """Share of our tokens before the first difference: greedy decodes agree, then diverge."""
    n = 0
    for a, b in zip(ours, theirs, strict=False):
        if a != b:
            break
        n += 1
    return n / max(1, len(ours))
