"""apar_worker shortens GNU OpenMP's idle spin on import (apar_worker/omp.py), leaves a user's
own choice alone, says so when torch came first, and gives peers the user's environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import os, sys\n"
    "{first}"
    "import apar_worker.omp as omp\n"
    "print(os.environ.get('GOMP_SPINCOUNT'), 'GOMP_SPINCOUNT' in omp.user_env(), omp.spin_warning() is not None)\n"
)


def _probe(first: str = "", **env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(first=first)],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_import_sets_a_short_spin_that_peers_do_not_inherit():
    assert _probe() == ["20000", "False", "False"]


@pytest.mark.parametrize("var", ["GOMP_SPINCOUNT", "OMP_WAIT_POLICY"])
def test_a_users_own_spin_or_wait_policy_wins_and_reaches_peers(var):
    spin, to_peers, warned = _probe(**{var: "7" if var == "GOMP_SPINCOUNT" else "PASSIVE"})
    assert spin == ("7" if var == "GOMP_SPINCOUNT" else "None")
    assert to_peers == ("True" if var == "GOMP_SPINCOUNT" else "False") and warned == "False"


def test_torch_loaded_first_is_reported():
    assert _probe(first="import torch\n") == ["20000", "False", "True"]
