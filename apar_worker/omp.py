"""GNU OpenMP's idle spin, shortened so torch's threads leave the CPU to the engine's pool.

torch's CPU ops run on GNU OpenMP, whose threads spin for some 300,000 pauses (milliseconds)
after each parallel region before they sleep. The engine's C++ kernels run on their own
spinning pool (csrc/spin_pool.h). On 2 vCPUs an OpenMP thread still spinning after the last
torch op of a step (the argmax over 2 or more rows) holds the CPU the pool needs until the OS
preempts it, about 4 ms into the next step's first layer: a 2-row int8 step took 16 ms, not
6.4. With 20,000 pauses (well under a millisecond) torch's back-to-back ops lose nothing
(`transformers`' forward measured the same). libgomp reads the variable once, when torch
loads it, so `apar_worker` sets it on import; a process that loaded torch first keeps the
long spin, and the engine says so. A user's own GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
"""

from __future__ import annotations

import os
import sys

SPIN_VAR = "GOMP_SPINCOUNT"
SPIN = "20000"
_state = {"ours": False, "late": False}


def shorten_spin() -> None:
    """Set GOMP_SPINCOUNT unless the user chose a spin or wait policy (on apar_worker import)."""
    if SPIN_VAR in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ[SPIN_VAR] = SPIN
    _state["ours"] = True
    _state["late"] = "torch" in sys.modules


def spin_warning() -> str | None:
    """Why the shortened spin may not hold in this process, the first time asked; else None."""
    if not _state["late"]:
        return None
    _state["late"] = False
    return (
        "torch was imported before apar_worker, so GNU OpenMP keeps its long idle spin, which "
        "slows the native kernels' multi-row steps on few CPUs; import apar_worker first or set "
        f"{SPIN_VAR}={SPIN}"
    )


def user_env() -> dict[str, str]:
    """This process's environment as the user set it: for peers measured next to the engine."""
    env = dict(os.environ)
    if _state["ours"]:
        env.pop(SPIN_VAR, None)
    return env
