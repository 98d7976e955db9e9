"""APAR engine: paged KV cache with fork sharing, continuous batching, HF model execution."""

from apar_worker.omp import shorten_spin

shorten_spin()  # before anything loads torch (omp.py)


from apar_worker.types import (  # noqa: E402
    AparError,
    BranchEvent,
    BranchInfo,
    EngineStats,
    GenerateRequest,
    InvalidRequestError,
    ModelLoadError,
    RequestOutput,
    SamplingParams,
)

__all__ = [
    "AparError",
    "BranchEvent",
    "BranchInfo",
    "EngineStats",
    "GenerateRequest",
    "InvalidRequestError",
    "ModelLoadError",
    "RequestOutput",
    "SamplingParams",
]
