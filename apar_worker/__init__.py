"""APAR engine: paged KV cache with fork sharing, continuous batching, HF model execution."""

from apar_worker.types import (
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
