"""The engine's C++ CPU kernels (`apar_worker/csrc/`: decode attention, small-batch linear
layers), built on first use, or None.

`torch.utils.cpp_extension.load` compiles them once per machine and torch version into torch's
extension cache (`$TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions; about a minute with
g++ and ninja), then loads the cached library in well under a second. Vector flags come from
/proc/cpuinfo (AVX2/FMA, AVX-512F where present) rather than -march=native, which can pick up ISA
extensions a sandbox advertises but does not grant. Where there is no compiler, no ninja, or
the build fails, `native_module()` logs one warning and returns None, and attention and linear
layers run on torch ops (`EngineConfig.native_kernels = False` asks for that directly).
"""

from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [
    CSRC / name
    for name in (
        "bindings.cpp",
        "paged_decode.cpp",
        "skinny_linear.cpp",
        "amx_linear.cpp",
        "bf16_rows.cpp",
        "decoder_ops.cpp",
        "lean_layer.cpp",
        "peak.cpp",
    )
]


def _cpu_flags() -> list[str]:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        return []
    names = {"avx512_bf16": "avx512bf16"}  # /proc/cpuinfo's name -> the compiler's
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16")
    return [f"-m{names.get(f, f)}" for f in wanted if f in flags]


def decode_kernel_for(cache: torch.Tensor, enabled: bool = True) -> Any | None:
    """The kernel where it applies (enabled, a float32 KV cache on CPU), else None."""
    if not enabled or cache.device.type != "cpu" or cache.dtype != torch.float32:
        return None
    return native_module()


@functools.cache
def native_module() -> Any | None:
    """The built extension module (`paged_decode`, `paged_prefix`, `pack_panels`, `skinny_linear`), or None
    where it cannot be built."""
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if missing:
        log.warning(
            "native kernels unavailable (no %s on PATH); attention and linears run on torch ops",
            ", ".join(missing),
        )
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="apar_native",
            sources=[str(path) for path in SOURCES],
            extra_cflags=["-O3", "-fopenmp", *_cpu_flags()],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # a compiler error is a warning: the torch path still serves
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("native kernels failed to build (%s); attention and linears run on torch ops", first)
        return None
