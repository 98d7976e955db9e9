"""The APAR engine: admits requests, runs steps, applies the fork rules, emits results.

One `step()` = one forward pass over every running branch of every request (DESIGN §4).
After sampling, a branch that produced `[Fork]` spawns a child that shares the parent's KV
blocks and is fed `[Child]` at the parent's next position (DESIGN §2).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from apar_worker.attention import SeqSlice
from apar_worker.chat import encode_request
from apar_worker.detokenizer import IncrementalDetokenizer
from apar_worker.kv_cache import BlockPool, KVCache
from apar_worker.model_runner import (
    ModelRunner,
    load_model_and_tokenizer,
    model_shape,
    parse_dtype,
    pick_device,
)
from apar_worker.sampling import make_generator, sample
from apar_worker.scheduler import Scheduler, SchedulerConfig
from apar_worker.sequence import Branch, RequestState, RequestStatus, assemble, branch_infos
from apar_worker.types import (
    BranchEvent,
    EngineStats,
    FinishReason,
    GenerateRequest,
    InvalidRequestError,
    RequestOutput,
)

log = logging.getLogger(__name__)

FORK_TOKEN = "[Fork]"
CHILD_TOKEN = "[Child]"

# hook(rows, logits) -> logits or None: sees raw logits of the sampling rows (tests, processors)
LogitsHook = Callable[[list[tuple[RequestState, Branch]], torch.Tensor], "torch.Tensor | None"]


@dataclass
class EngineConfig:
    model: str = "apar-tiny"
    device: str = "auto"
    dtype: str = "float32"
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from kv_cache_memory_mb
    kv_cache_memory_mb: int = 256
    max_num_batched_tokens: int = 1024
    max_num_seqs: int = 128
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None: the model's own
    expected_forks: int = 4


class Engine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        model=None,
        tokenizer=None,
        logits_hook: LogitsHook | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        if model is None:
            device = pick_device(config.device)
            model, tokenizer = load_model_and_tokenizer(config.model, device, parse_dtype(config.dtype))
        if tokenizer is None:
            raise ValueError("a tokenizer is required with an in-memory model")
        self.tokenizer = tokenizer
        self.logits_hook = logits_hook
        shape = model_shape(model)
        self.vocab_size = shape.vocab_size
        self.max_model_len = min(config.max_model_len or shape.max_model_len, shape.max_model_len)
        param = next(model.parameters())
        num_blocks = config.num_blocks
        if num_blocks is None:
            per_block = KVCache.bytes_per_block(
                shape.num_layers, config.block_size, shape.num_kv_heads, shape.head_dim, param.dtype
            )
            num_blocks = max(4, config.kv_cache_memory_mb * 2**20 // per_block)
        self.pool = BlockPool(num_blocks, config.block_size, config.enable_prefix_caching)
        self.kv_cache = KVCache(
            shape.num_layers,
            num_blocks,
            config.block_size,
            shape.num_kv_heads,
            shape.head_dim,
            param.dtype,
            param.device,
        )
        self.runner = ModelRunner(model, self.kv_cache)
        self.scheduler = Scheduler(
            self.pool,
            SchedulerConfig(
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_num_seqs=config.max_num_seqs,
                expected_forks=config.expected_forks,
            ),
        )
        vocab = tokenizer.get_vocab()
        self.fork_id: int | None = vocab.get(FORK_TOKEN)
        self.child_id: int | None = vocab.get(CHILD_TOKEN)
        self.eos_ids = self._eos_ids(model, tokenizer)
        self.requests: dict[str, RequestState] = {}
        self._arrivals = itertools.count()
        self._pending_outputs: list[RequestOutput] = []
        self.num_steps = 0
        self.generated_tokens = 0
        self.last_step_attended_tokens = 0

    @classmethod
    def from_model(cls, model, tokenizer, config: EngineConfig | None = None, **kw) -> Engine:
        return cls(config, model=model, tokenizer=tokenizer, **kw)

    @staticmethod
    def _eos_ids(model, tokenizer) -> set[int]:
        ids: set[int] = set()
        gen = getattr(model, "generation_config", None)
        for src in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, list | tuple):
                ids.update(int(x) for x in src)
        return ids

    # ---- requests -----------------------------------------------------------------------

    def tokenize(self, req: GenerateRequest) -> list[int]:
        return encode_request(self.tokenizer, req, self.vocab_size)

    def add_request(self, req: GenerateRequest) -> None:
        req.validate()
        if req.request_id in self.requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use")
        prompt_ids = self.tokenize(req)
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty after tokenisation")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(prompt_ids)} tokens; the model's context is {self.max_model_len} tokens"
            )
        state = RequestState(req, prompt_ids, next(self._arrivals))
        root = Branch(id=0, parent=None, depth=0, tokens=list(prompt_ids), own_start=len(prompt_ids))
        self._init_branch(state, root)
        self.requests[req.request_id] = state
        self.scheduler.add(state)

    def _init_branch(self, state: RequestState, br: Branch) -> None:
        req = state.request
        br.generator = make_generator(req.sampling.seed, br.id)
        if req.stream or req.sampling.stop:
            br.detok = IncrementalDetokenizer(self.tokenizer)
        state.branches.append(br)

    def abort(self, request_id: str, reason: FinishReason = "cancelled") -> None:
        """End a request now and free its blocks; its RequestOutput comes with the next step."""
        state = self.requests.get(request_id)
        if state is None or state.status is RequestStatus.FINISHED:
            return
        self._pending_outputs.append(self._finish_request(state, reason))

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._pending_outputs)

    # ---- one step -----------------------------------------------------------------------

    def step(self) -> list[BranchEvent | RequestOutput]:
        results: list[BranchEvent | RequestOutput] = list(self._pending_outputs)
        self._pending_outputs.clear()
        self._expire_deadlines(results)
        sched = self.scheduler.schedule()
        for state, msg in sched.rejected:
            state.error = msg
            results.append(self._finish_request(state, "error"))
        if not sched.scheduled:
            return results
        self.kv_cache.copy_blocks(sched.copies)
        input_ids: list[int] = []
        positions: list[int] = []
        seqs: list[SeqSlice] = []
        sample_rows: list[int] = []
        sampled: list[tuple[RequestState, Branch]] = []
        for sb in sched.scheduled:
            br, start, n = sb.branch, sb.start, sb.num_tokens
            offset = len(input_ids)
            input_ids.extend(br.tokens[start : start + n])
            positions.extend(range(start, start + n))
            seqs.append(SeqSlice(offset, offset + n, br.block_table, start))
            if sb.sample:
                sample_rows.append(offset + n - 1)
                sampled.append((sb.request, br))
        try:
            logits = self.runner.execute(input_ids, positions, seqs, sample_rows)
        except Exception as exc:  # a failed forward must not take the other requests down
            log.exception("engine step failed")
            for state in {id(sb.request): sb.request for sb in sched.scheduled}.values():
                state.error = f"engine step failed: {exc}"
                results.append(self._finish_request(state, "error"))
            return results
        self.num_steps += 1
        self.last_step_attended_tokens = self.runner.last_attended_tokens
        for state in {id(sb.request): sb.request for sb in sched.scheduled}.values():
            state.steps += 1
        for sb in sched.scheduled:
            sb.branch.num_computed += sb.num_tokens
            for block, h in sb.branch.update_block_hashes(self.pool.block_size):
                self.pool.register(block, h)
        if sampled:
            self._sample_and_apply(sampled, logits, results)
        return results

    def _sample_and_apply(self, rows, logits: torch.Tensor, results: list) -> None:
        if self.logits_hook is not None:
            replaced = self.logits_hook(rows, logits)
            if replaced is not None:
                logits = replaced
        if self.child_id is not None:
            logits[:, self.child_id] = -math.inf
        if self.fork_id is not None:
            for i, (_, br) in enumerate(rows):
                if br.tokens[-1] in (self.fork_id, self.child_id):
                    logits[i, self.fork_id] = -math.inf
        tokens = sample(
            logits,
            [s.request.sampling for s, _ in rows],
            [br.tokens for _, br in rows],
            [br.generator for _, br in rows],
        )
        now = time.monotonic()
        finished: dict[int, RequestState] = {}
        for (state, br), tok in zip(rows, tokens, strict=True):
            if state.status is not RequestStatus.RUNNING or br.finished:
                continue  # ended by max_tokens earlier in this loop
            if state.first_token_time is None:
                state.first_token_time = now
            self._append_token(state, br, tok, results)
            if not state.live_branches():
                finished[id(state)] = state
        for state in finished.values():
            # a branch cut off by the model's context makes the answer "length", not "stop"
            cut = any(b.finish_reason == "length" for b in state.branches)
            results.append(self._finish_request(state, state.finish_reason or ("length" if cut else "stop")))

    def _append_token(self, state: RequestState, br: Branch, tok: int, results: list) -> None:
        req = state.request
        br.tokens.append(tok)
        state.num_generated += 1
        self.generated_tokens += 1
        # A child's creation has its own event; the root's first token announces the root.
        first_root = br.parent is None and len(br.tokens) == br.own_start + 1
        event = BranchEvent(
            req.request_id, br.id, br.parent.id if br.parent else None, [tok], created=first_root
        )
        results.append(event)
        if br.detok is not None:
            delta = br.detok.add(tok)
            br.text += delta
            event.delta_text = delta
            if req.sampling.stop and self._hit_stop(br, req.sampling.stop):
                self._end_branch(br, "stop", event)
        if br.finished:
            pass
        elif tok in self.eos_ids and not req.sampling.ignore_eos:
            self._end_branch(br, "stop", event)
        elif tok == self.fork_id and self._may_fork(state, br):
            self._fork(state, br, results)
        if not br.finished and len(br.tokens) >= self.max_model_len:
            self._end_branch(br, "length", event)
        if state.num_generated >= req.sampling.max_tokens:
            for other in state.live_branches():
                ev = event
                if other is not br:
                    ev = BranchEvent(req.request_id, other.id, other.parent.id if other.parent else None, [])
                    results.append(ev)
                self._end_branch(other, "length", ev)
            state.finish_reason = "length"

    def _may_fork(self, state: RequestState, br: Branch) -> bool:
        req = state.request
        return req.fork and br.depth < req.max_depth and len(state.branches) < req.max_branches

    def _fork(self, state: RequestState, parent: Branch, results: list) -> None:
        """Child shares the parent's computed blocks; it is fed [Fork]@p and [Child]@p+1."""
        p = len(parent.tokens) - 1
        bs = self.pool.block_size
        child = Branch(
            id=len(state.branches),
            parent=parent,
            depth=parent.depth + 1,
            tokens=parent.tokens + [self.child_id],
            own_start=len(parent.tokens),
            fork_index=len(parent.output_ids) - 1,
        )
        shared = parent.block_table[: -(-min(p, parent.num_computed) // bs)]
        for block in shared:
            self.pool.incref(block)
        child.block_table = list(shared)
        child.num_computed = min(p, parent.num_computed)
        child.block_hashes = parent.block_hashes[: child.num_computed // bs]
        parent.children[child.fork_index] = child
        self._init_branch(state, child)
        results.append(BranchEvent(state.request.request_id, child.id, parent.id, [], created=True))

    def _hit_stop(self, br: Branch, stops: list[str]) -> bool:
        for s in stops:
            idx = br.text.find(s, max(0, len(br.text) - len(s) - 64))
            if idx >= 0:
                br.text = br.text[:idx]
                return True
        return False

    def _end_branch(self, br: Branch, reason: FinishReason, event: BranchEvent) -> None:
        if br.finished:
            return
        br.finish_reason = reason
        self.scheduler.free_branch(br)
        event.finish_reason = reason

    def _expire_deadlines(self, results: list) -> None:
        now = time.monotonic()
        for state in list(self.requests.values()):
            if state.request.deadline is not None and now >= state.request.deadline:
                results.append(self._finish_request(state, "deadline"))

    # ---- results ------------------------------------------------------------------------

    def _finish_request(self, state: RequestState, reason: FinishReason) -> RequestOutput:
        for br in state.live_branches():
            br.finish_reason = reason
        state.status = RequestStatus.FINISHED
        state.finish_reason = state.finish_reason or reason
        state.finish_time = time.monotonic()
        self.scheduler.remove(state)
        self.requests.pop(state.request_id, None)
        return self._output(state)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _output(self, state: RequestState) -> RequestOutput:
        decode = self._decode
        if state.request.sampling.stop:
            texts = {id(b): b.text for b in state.branches}
            text = _assemble_tracked(state.root, texts, decode)
            infos = branch_infos(state, decode)
            for info, b in zip(infos, state.branches, strict=True):
                if b.detok is not None and b.finish_reason == "stop":
                    info.text = b.text
        else:
            text = assemble(state.root, decode)
            infos = branch_infos(state, decode)
        end = state.finish_time or time.monotonic()
        return RequestOutput(
            request_id=state.request_id,
            text=text,
            branches=infos,
            finish_reason=state.finish_reason or "stop",
            prompt_tokens=len(state.prompt_ids),
            num_tokens=state.num_generated,
            steps=state.steps,
            cached_tokens=state.cached_tokens,
            ttft_s=(state.first_token_time - state.arrival_time) if state.first_token_time else None,
            latency_s=end - state.arrival_time,
            error=state.error,
            num_preemptions=state.num_preemptions,
        )

    # ---- conveniences -------------------------------------------------------------------

    def stats(self) -> EngineStats:
        sch = self.scheduler
        seen = sch.prompt_tokens_seen
        return EngineStats(
            running_requests=len(sch.running),
            waiting_requests=len(sch.waiting),
            running_branches=sum(len(s.live_branches()) for s in sch.running),
            free_blocks=self.pool.num_free,
            total_blocks=self.pool.num_blocks,
            prefix_hit_rate=(sch.prompt_tokens_cached / seen) if seen else 0.0,
            steps=self.num_steps,
            num_preemptions=sch.num_preemptions,
            generated_tokens=self.generated_tokens,
        )

    def generate(self, requests: list[GenerateRequest]) -> list[RequestOutput]:
        """Run the given requests to completion (batched together) and return their outputs."""
        for req in requests:
            self.add_request(req)
        wanted = {r.request_id for r in requests}
        done: dict[str, RequestOutput] = {}
        while wanted - done.keys():
            for item in self.step():
                if isinstance(item, RequestOutput) and item.request_id in wanted:
                    done[item.request_id] = item
        return [done[r.request_id] for r in requests]


def _assemble_tracked(branch: Branch, texts: dict[int, str], decode) -> str:
    """Assembly for stop-string requests: a branch's last segment is cut where its stop hit."""
    out = branch.output_ids
    parts: list[str] = []
    start = 0
    for idx in sorted(branch.children):
        parts.append(decode(out[start:idx]))
        parts.append(_assemble_tracked(branch.children[idx], texts, decode))
        start = idx + 1
    tail = decode(out[start:])
    if branch.finish_reason == "stop" and branch.detok is not None:
        full = texts[id(branch)]
        # The tracked text is the whole branch text already cut at the stop string.
        consumed = len(decode(out[:start])) if start else 0
        tail = full[consumed:] if len(full) >= consumed else ""
    parts.append(tail)
    return "".join(parts)
