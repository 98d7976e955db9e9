"""Speculative decoding inside APAR branches: who proposes drafts, and how many.

A branch in decode may feed its pending token plus k draft tokens in one step; the engine then
samples each of those positions in order with the branch's own sampler and keeps a draft
while it equals what was sampled (`apar_worker/acceptance.py`). Every proposal here is a single
token (a point mass q), for which the standard rejection rule (accept with min(1, p/q), else
resample from norm(max(0, p - q))) is exactly "sample from p, keep while equal": the output
distribution, and a greedy or seeded output token for token, are those without drafts.

k adapts to the batch: drafts cost compute a full batch no longer has spare. A branch feeds the
j-th draft only while alpha^j (alpha: its recent per-position acceptance) beats the least
acceptance that raises the step's tokens per second (`step_cost.StepCost`, learnt from the
steps that ran: nearly 0 on a GPU, high for a big batch on a CPU), and all decoding branches
together feed at most `token_budget` tokens (their pending ones included).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol

from apar_worker.sequence import Branch, RequestState
from apar_worker.step_cost import StepCost
from apar_worker.types import SPECULATIVE_METHODS, InvalidRequestError

MAX_SPECULATIVE_TOKENS = 6  # pending (at most 2: a child's [Fork][Child]) + drafts stay batched


@dataclass
class SpeculativeConfig:
    """vLLM-style `speculative` config: `{"method": "ngram", "num_speculative_tokens": 4}`."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2  # ngram (and draft_heads, before its heads): shortest suffix matched
    prompt_lookup_max: int = 4  # ngram (and draft_heads' lookup): longest suffix tried first
    token_budget: int = 32  # cap: tokens all decoding branches feed together, drafts included
    draft_heads: str | None = None  # draft_heads: file of trained heads (default: the model's own)

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise InvalidRequestError(
                f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.method!r}"
            )
        k = self.num_speculative_tokens
        if not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise InvalidRequestError(
                f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}"
            )
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise InvalidRequestError("need 1 <= prompt_lookup_min <= prompt_lookup_max")
        if not isinstance(self.token_budget, int) or self.token_budget < 2:
            raise InvalidRequestError(f"token_budget must be an integer >= 2, got {self.token_budget!r}")

    @classmethod
    def parse(cls, value: str | dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """From a JSON string (`--speculative-config`), a dict (config file) or None (off)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            if value.strip().lower() in ("", "none", "off", "null"):
                return None
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"speculative config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise InvalidRequestError("speculative config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidRequestError(
                f"unknown speculative config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**value)

    def to_dict(self) -> dict:
        return asdict(self)


class Proposer(Protocol):
    """Proposes up to `k` draft tokens that would follow a branch's context."""

    def propose(self, state: RequestState, br: Branch, k: int) -> list[int]: ...


class NgramProposer:
    """Prompt lookup (model-free): find the latest earlier occurrence of the context's last n
    tokens (n from `max_n` down to `min_n`) in the branch's own visible context (prompt and
    ancestry) and propose what followed it."""

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, state: RequestState, br: Branch, k: int) -> list[int]:
        return ngram_lookup(br.tokens, k, self.min_n, self.max_n)


def ngram_lookup(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        pattern = tokens[size - n :]
        first = pattern[0]
        for i in range(size - n - 1, -1, -1):
            if tokens[i] == first and tokens[i : i + n] == pattern:
                return tokens[i + n : i + n + k]
    return []


class Speculator:
    """Per step: how many drafts each decoding branch may feed, and the drafts themselves."""

    def __init__(
        self, config: SpeculativeConfig | None, proposers: dict[str, Proposer], child_id: int | None
    ):
        self.config = config
        self.proposers = proposers
        self.child_id = child_id  # [Child] is never accepted, so never proposed either
        self.cost = StepCost()  # the engine adds each step's (tokens, seconds)
        self.draft_tokens = 0  # drafts fed (all steps)
        self.accepted_tokens = 0  # ... of which accepted

    @classmethod
    def build(
        cls,
        value: SpeculativeConfig | dict | str | None,
        child_id: int | None,
        model=None,
        model_dir: Path | None = None,
        proposers: dict | None = None,
    ) -> Speculator:
        """The engine's speculator: ngram always (any request may ask for it), draft heads when
        the model directory has them (or the config names a file), and any given proposers."""
        spec = SpeculativeConfig.parse(value)
        lookup = spec or SpeculativeConfig()
        found: dict = {"ngram": NgramProposer(lookup.prompt_lookup_min, lookup.prompt_lookup_max)}
        if model is not None and (model_dir is not None or lookup.draft_heads):
            from apar_worker.draft_heads import load_proposer  # torch: only with a real model

            span = (lookup.prompt_lookup_min, lookup.prompt_lookup_max)
            heads = load_proposer(model, model_dir, lookup.draft_heads, span)
            if heads is not None:
                found["draft_heads"] = heads
        found.update(proposers or {})
        if spec is not None and spec.method not in found:
            raise InvalidRequestError(
                f"speculative method {spec.method!r}: this model has no draft heads "
                "(train them with `apar train --config NAME --draft-heads`)"
            )
        return cls(spec, found, child_id)

    @property
    def wants_hidden(self) -> bool:
        """A proposer reads the hidden states of each step (draft heads)."""
        return any(hasattr(p, "observe") for p in self.proposers.values())

    def check(self, request) -> None:
        """A request may only ask for a proposer the engine has."""
        if request.speculative not in (None, "off") and request.speculative not in self.proposers:
            raise InvalidRequestError(
                f"speculative {request.speculative!r} is not available here (have: {', '.join(self.proposers)})"
            )

    def observe(self, rows: list[tuple[RequestState, Branch]], last: list[int], hidden) -> None:
        """After a step: proposers that read hidden states see the rows of their requests."""
        if hidden is None:
            return
        for name, proposer in self.proposers.items():
            if not hasattr(proposer, "observe"):
                continue
            sel = [
                i
                for i, (state, br) in enumerate(rows)
                if last[i] >= 0 and not br.finished and self.method_for(state) == name
            ]
            proposer.observe([rows[i] for i in sel], hidden[[last[i] for i in sel]])

    def method_for(self, state: RequestState) -> str | None:
        """The request's own choice ("off" or a method), else the deployment's."""
        chosen = state.request.speculative
        if chosen == "off":
            return None
        return chosen or (self.config.method if self.config else None)

    def drafts(self, running: list[RequestState]) -> dict[int, list[int]]:
        """id(branch) -> draft tokens, for the decoding branches of requests that speculate."""
        decoding: list[tuple[RequestState, Branch, Proposer]] = []
        for state in running:
            method = self.method_for(state)
            if method is None:
                continue
            proposer = self.proposers.get(method)
            if proposer is None:
                continue
            if any(br.wait_for_parent is not None for br in state.live_branches()):
                continue  # rejoining after preemption: every branch steps in lockstep
            for br in state.live_branches():
                if 1 <= br.num_pending <= 2:
                    decoding.append((state, br, proposer))
        if not decoding:
            return {}
        cfg = self.config or SpeculativeConfig()
        per_branch = cfg.token_budget // len(decoding)
        need = self.cost.threshold(sum(br.num_pending for _, br, _ in decoding), len(decoding))
        out: dict[int, list[int]] = {}
        for state, br, proposer in decoding:
            k = min(cfg.num_speculative_tokens, per_branch - br.num_pending, _worth(br, need, cfg))
            if k <= 0:
                continue
            draft = proposer.propose(state, br, k)[:k]
            if self.child_id is not None and self.child_id in draft:
                draft = draft[: draft.index(self.child_id)]
            if draft:
                out[id(br)] = draft
        return out

    def record(self, br: Branch, drafted: int, accepted: int) -> None:
        br.spec_steps += 1
        br.spec_drafted += drafted
        br.spec_accepted += accepted
        if drafted:  # per-position acceptance: positions tried (up to the first miss) vs kept
            br.spec_recent = (br.spec_recent * 3 + accepted / min(accepted + 1, drafted)) / 4
        self.draft_tokens += drafted
        self.accepted_tokens += accepted


def _worth(br: Branch, need: float, cfg: SpeculativeConfig) -> int:
    """Drafts worth feeding: the j-th is kept with probability about alpha^j (alpha: the branch's
    recent per-position acceptance), and it must beat the step's threshold (step_cost.py). A
    branch with none worth it still probes with one draft every 8 tokens, so alpha can recover."""
    k, p = 0, 1.0
    while k < cfg.num_speculative_tokens:
        p *= br.spec_recent
        if p <= need:
            break
        k += 1
    return k if k or len(br.tokens) % 8 else 1
