"""Benchmarks (`apar bench`) and hand-run checks of the engine and the cluster."""

import apar_worker  # noqa: F401  # first: shortens OpenMP's idle spin before torch loads (apar_worker/omp.py)
