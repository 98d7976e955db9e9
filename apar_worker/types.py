"""Public request/response types of the APAR engine.

These are the contract between the engine, the cluster (which maps them to gRPC messages)
and the CLI. They are plain dataclasses so they pickle across Ray actors.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

# The KV block sizes the engine allows; the pool-invariant and HF-parity tests run at each.
# Smaller blocks waste less of each live branch's last, partly filled block (APAR has many
# live branches), at the price of longer block tables.
BLOCK_SIZES = (4, 8, 16, 32)
DEFAULT_BLOCK_SIZE = 8  # not vLLM's 16: APAR's many live branches each leave their last block part empty

FinishReason = Literal["stop", "length", "cancelled", "deadline", "error"]

# The APAR control tokens (docs/design.md, "Decoding contract"): a branch samples `[Fork]` to
# make a child; the engine feeds `[Child]` as the child's first token (it is never sampled).
FORK_TOKEN = "[Fork]"
CHILD_TOKEN = "[Child]"
CONTROL_TOKENS = (FORK_TOKEN, CHILD_TOKEN)

# Draft proposers of speculative decoding (apar_worker/speculative.py).
SPECULATIVE_METHODS = ("ngram", "draft_heads")
LINEAR_KERNELS = (
    "auto",
    "plain",
    "onednn",
    "native",
    "amx",
    "bf16",
)  # EngineConfig.linear_kernel (apar_worker/packed_linear.py)


class AparError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(AparError, ValueError):
    """The request is malformed (maps to gRPC INVALID_ARGUMENT, CLI exit code 2)."""


class ModelLoadError(AparError):
    """The model directory/name cannot be loaded (CLI exit code 2)."""


@dataclass
class SamplingParams:
    """Per-request sampling. temperature == 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")


@dataclass
class ResumedBranch:
    """A branch another replica already decoded part of (cluster failover, `GenerateRequest.resume`).

    `token_ids` are its own sampled tokens so far (control tokens included, a child's forced
    `[Child]` not); `fork_index` is the index of the `[Fork]` in the parent's `token_ids` that
    made it (None for the root).
    """

    id: int
    parent: int | None
    fork_index: int | None
    token_ids: list[int]
    finish_reason: FinishReason | None = None


@dataclass
class GenerateRequest:
    """One generation request.

    Exactly one of `prompt` (raw text, used as is), `prompt_token_ids`, or `messages`
    (chat turns [{"role", "content"}], rendered with the tokenizer's chat template) is set.
    `fork=False` decodes the same model sequentially: `[Fork]` is kept as plain text in the
    context (so the model sees what it was trained on) but no child is made and it never
    appears in the output.
    """

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    fork: bool = True
    max_depth: int = 2
    max_branches: int = 32
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    stream: bool = False  # compute per-step text deltas (costs detokenisation per step)
    deadline: float | None = None  # absolute time.monotonic() deadline
    session_id: str | None = None  # only used by the cluster for affinity
    # Failover: continue these branches (root first, parents before children) instead of
    # starting over; their tokens are prefilled as context (apar_worker/resume.py).
    resume: list[ResumedBranch] | None = None
    # Speculative decoding: None follows the deployment, "off" disables it, a method
    # (SPECULATIVE_METHODS) picks that proposer for this request.
    speculative: str | None = None

    def validate(self) -> None:
        given = [x is not None for x in (self.prompt, self.prompt_token_ids, self.messages)]
        if sum(given) != 1:
            raise InvalidRequestError("exactly one of prompt, prompt_token_ids or messages must be set")
        if self.prompt is not None and not self.prompt.strip():
            raise InvalidRequestError("prompt must not be empty")
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) == 0:
            raise InvalidRequestError("prompt_token_ids must not be empty")
        if self.messages is not None:
            if not self.messages:
                raise InvalidRequestError("messages must not be empty")
            for m in self.messages:
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise InvalidRequestError("each message needs 'role' and 'content'")
            if not any(str(m["content"]).strip() for m in self.messages):
                raise InvalidRequestError("messages must not all be empty")
        if self.max_depth < 0:
            raise InvalidRequestError(f"max_depth must be >= 0, got {self.max_depth}")
        if self.max_branches < 1:
            raise InvalidRequestError(f"max_branches must be >= 1, got {self.max_branches}")
        if not self.request_id:
            raise InvalidRequestError("request_id must not be empty")
        if self.speculative not in (None, "off", *SPECULATIVE_METHODS):
            raise InvalidRequestError(
                f"speculative must be 'off' or one of {', '.join(SPECULATIVE_METHODS)}, got {self.speculative!r}"
            )
        self.sampling.validate()


@dataclass
class BranchInfo:
    """Summary of one branch of a finished (or in-flight) request."""

    id: int
    parent: int | None  # None for the root branch
    text: str
    num_tokens: int
    finish_reason: FinishReason | None
    fork_position: int | None = None  # index in the parent's output tokens where it forked
    token_ids: list[int] = field(default_factory=list)  # own output tokens, control tokens included
    spec_steps: int = 0  # steps it fed speculative drafts in
    spec_drafted: int = 0  # drafts it fed
    spec_accepted: int = 0  # ... of which accepted

    @property
    def acceptance_length(self) -> float | None:
        """Tokens it gained per step that fed drafts (accepted drafts + the one sampled)."""
        return 1 + self.spec_accepted / self.spec_steps if self.spec_steps else None


@dataclass
class BranchEvent:
    """Streaming event: something happened to one branch during one engine step.

    `new_token_ids` are the tokens sampled this step (control tokens included);
    `delta_text` is filled only for `stream=True` requests. A branch's first event has
    `created=True`.
    """

    request_id: str
    branch_id: int
    parent_id: int | None
    new_token_ids: list[int]
    delta_text: str = ""
    created: bool = False
    finish_reason: FinishReason | None = None


@dataclass
class RequestOutput:
    """Final result of a request: assembled text in reading order plus the branch tree."""

    request_id: str
    text: str
    branches: list[BranchInfo]
    finish_reason: FinishReason
    prompt_tokens: int
    num_tokens: int  # generated tokens over all branches (sampled tokens, control tokens included)
    steps: int  # engine steps this request took part in, from first scheduling to finish
    cached_tokens: int  # prompt tokens served from the prefix cache
    ttft_s: float | None = None
    latency_s: float = 0.0
    error: str | None = None
    num_preemptions: int = 0

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "branches": [
                {
                    "id": b.id,
                    "parent": b.parent,
                    "text": b.text,
                    "num_tokens": b.num_tokens,
                    "finish_reason": b.finish_reason,
                    **(
                        {
                            "draft_tokens": b.spec_drafted,
                            "accepted_tokens": b.spec_accepted,
                            "acceptance_length": round(b.acceptance_length, 3),
                        }
                        if b.acceptance_length is not None
                        else {}
                    ),
                }
                for b in self.branches
            ],
            "steps": self.steps,
            "num_tokens": self.num_tokens,
            "latency_s": round(self.latency_s, 6),
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason,
        }


@dataclass
class EngineStats:
    running_requests: int
    waiting_requests: int
    running_branches: int
    free_blocks: int
    total_blocks: int
    prefix_hit_rate: float
    steps: int
    num_preemptions: int
    generated_tokens: int
    spec_draft_tokens: int = 0  # speculative drafts fed, all steps
    spec_accepted_tokens: int = 0  # ... of which accepted
