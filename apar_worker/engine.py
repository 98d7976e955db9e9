"""The APAR engine: admits requests, runs steps, emits results.

One `step()` is one forward pass over every running branch of every request, and reads as
schedule -> `ModelRunner.prepare` + `execute` -> update from the output -> outputs
(docs/design.md, "Scheduling contract"). Who runs is the scheduler's; where K/V live, the KV
manager's; what a sampled token does (fork, stop, limits), `apar_rules`; the answer text,
`output`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from apar_worker.acceptance import LogitsHook, TokenApplier
from apar_worker.apar_rules import AparRules, ControlIds
from apar_worker.chat import encode_request
from apar_worker.detokenizer import IncrementalDetokenizer
from apar_worker.kv_cache import BlockPool, KVCache
from apar_worker.kv_manager import KVManager
from apar_worker.model_registry import resolve_model
from apar_worker.model_runner import (
    ModelRunner,
    ModelShape,
    load_model_and_tokenizer,
    model_shape,
    parse_dtype,
    pick_device,
)
from apar_worker.native import decode_kernel_for, native_module
from apar_worker.omp import spin_warning
from apar_worker.output import request_output
from apar_worker.packed_linear import pack_model, parse_linear_kernel
from apar_worker.quantization import NativeInt8Linear, int8_layout, parse_quantization, quantize_model
from apar_worker.resume import rebuild_tree
from apar_worker.sampling import make_generator, stream_key
from apar_worker.scheduler import Scheduler, SchedulerConfig
from apar_worker.sequence import Branch, RequestState, RequestStatus
from apar_worker.speculative import Proposer, SpeculativeConfig, Speculator
from apar_worker.types import (
    DEFAULT_BLOCK_SIZE,
    BranchEvent,
    EngineStats,
    FinishReason,
    GenerateRequest,
    InvalidRequestError,
    ModelLoadError,
    RequestOutput,
)

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "LogitsHook"]  # hook(rows, logits): raw logits of sampled rows


@dataclass
class EngineConfig:
    model: str = "apar-smol"
    device: str = "auto"
    dtype: str = "float32"
    block_size: int = DEFAULT_BLOCK_SIZE
    num_blocks: int | None = None  # None: sized from kv_cache_memory_mb
    kv_cache_memory_mb: int = 256
    max_num_batched_tokens: int = 1024
    max_num_seqs: int = 128
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None: the model's own
    expected_forks: int = 4
    cascade_attention: bool = True  # sibling branches attend their shared prefix once (cascade.py)
    native_kernels: bool = True  # C++ CPU decode attention built on first use (native.py); False: torch ops
    quantization: str | None = None  # None/"none": plain weights; "int8": apar_worker.quantization
    # auto / plain / onednn / native / amx / bf16: how linears are packed (packed_linear.py; amx:
    # float32 as bf16 hi/lo AMX tiles; int8 on AMX tiles, else with bfloat16 rows (AVX512_BF16),
    # where auto finds them or amx / bf16 asks; native: int8 with float32 rows: quantization.py)
    linear_kernel: str = "auto"
    lean_forward: bool = True  # Llama-style models with the native kernels: lean_forward.py; False: HF's
    # Speculative decoding for every request (None: only for requests that ask for it), as
    # SpeculativeConfig or its dict / JSON form (apar_worker/speculative.py).
    speculative: SpeculativeConfig | dict | str | None = None


def _prepare_linears(model, config: EngineConfig, owned: bool) -> str:
    """Quantize (a no-op unless int8; on the native kernels where they may run), then pack the
    float linears, in place; returns the kernel chosen (packed_linear.py), `amx` or `bf16`
    where int8 layers run on AMX tiles or take bfloat16 rows."""
    int8 = parse_quantization(config.quantization) is not None
    linear_kernel = parse_linear_kernel(config.linear_kernel)
    if linear_kernel == "bf16" and not int8:
        raise ModelLoadError("linear_kernel bf16 gives int8 layers bfloat16 rows: it needs quantization int8")
    native_int8 = int8 and config.native_kernels and linear_kernel != "plain"
    kernel = native_module() if native_int8 else None  # looked up (built on first use) only if used
    layout = int8_layout(next(model.parameters()), kernel, linear_kernel) if int8 else "panels"
    quantize_model(model, config.quantization, kernel=kernel, layout=layout)
    on_native = any(isinstance(m, NativeInt8Linear) for m in model.modules())
    chosen = pack_model(model, config.linear_kernel, owned=owned, native_ok=config.native_kernels)
    return {"amx": "amx", "pairs": "bf16"}.get(layout, "native") if on_native else chosen


class Engine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        model=None,
        tokenizer=None,
        logits_hook: LogitsHook | None = None,
        proposers: dict[str, Proposer] | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        model_dir = None  # where draft heads may be: only for a model loaded by name
        if model is None:
            model_dir = resolve_model(config.model)
            device = pick_device(config.device)
            model, tokenizer = load_model_and_tokenizer(config.model, device, parse_dtype(config.dtype))
        if tokenizer is None:
            raise ValueError("a tokenizer is required with an in-memory model")
        self.linear_kernel = _prepare_linears(model, config, owned=model_dir is not None)
        self.tokenizer = tokenizer
        shape = model_shape(model)
        self.vocab_size = shape.vocab_size
        self.max_model_len = min(config.max_model_len or shape.max_model_len, shape.max_model_len)
        param = next(model.parameters())
        self.kv, kv_cache = self._make_kv(config, shape, param)
        native = decode_kernel_for(kv_cache.data, config.native_kernels)
        if native is not None and (late := spin_warning()):
            log.warning(late)
        self.runner = ModelRunner(model, kv_cache, config.cascade_attention, native, config.lean_forward)
        self.scheduler = Scheduler(
            self.kv,
            SchedulerConfig(
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_num_seqs=config.max_num_seqs,
                expected_forks=config.expected_forks,
            ),
        )
        ids = ControlIds.of(model, tokenizer)
        self.fork_id, self.child_id, self.eos_ids = ids.fork, ids.child, ids.eos
        self.rules = AparRules(ids, self.max_model_len, self.kv, self._init_branch)
        self.speculator = Speculator.build(config.speculative, ids.child, model, model_dir, proposers)
        self.runner.keep_hidden = self.speculator.wants_hidden
        argmax = getattr(native, "argmax_rows", None)  # greedy rows on the native kernel where it runs
        self.applier = TokenApplier(self.rules, self.kv, self.speculator, logits_hook, argmax)
        self.requests: dict[str, RequestState] = {}
        self._pending_outputs: list[RequestOutput] = []
        self.num_steps = 0
        self.generated_tokens = 0
        self.last_step_attended_tokens = 0

    @classmethod
    def _make_kv(
        cls, config: EngineConfig, shape: ModelShape, param: torch.Tensor
    ) -> tuple[KVManager, KVCache]:
        """The block bookkeeping and the cache tensors it indexes, sized alike."""
        num_blocks = config.num_blocks or cls._blocks_in_budget(config, shape, param.dtype)
        kv = KVManager(num_blocks, config.block_size, config.enable_prefix_caching)
        dims = (shape.num_layers, num_blocks, config.block_size, shape.num_kv_heads, shape.head_dim)
        return kv, KVCache(*dims, param.dtype, param.device)

    @staticmethod
    def _blocks_in_budget(config: EngineConfig, shape: ModelShape, dtype: torch.dtype) -> int:
        """How many KV blocks fit in `kv_cache_memory_mb` (at least 4)."""
        per_block = KVCache.bytes_per_block(
            shape.num_layers, config.block_size, shape.num_kv_heads, shape.head_dim, dtype
        )
        return max(4, config.kv_cache_memory_mb * 2**20 // per_block)

    @classmethod
    def from_model(cls, model, tokenizer, config: EngineConfig | None = None, **kw) -> Engine:
        return cls(config, model=model, tokenizer=tokenizer, **kw)

    @property
    def logits_hook(self) -> LogitsHook | None:
        """Sees (and may replace) the raw logits of the rows about to be sampled."""
        return self.applier.hook

    @logits_hook.setter
    def logits_hook(self, hook: LogitsHook | None) -> None:
        self.applier.hook = hook

    @property
    def pool(self) -> BlockPool:
        """The KV manager's block pool, to read (tests and benchmarks watch its free blocks)."""
        return self.kv.pool

    # ---- requests -----------------------------------------------------------------------

    def tokenize(self, req: GenerateRequest) -> list[int]:
        return encode_request(self.tokenizer, req, self.vocab_size)

    def add_request(self, req: GenerateRequest) -> None:
        req.validate()
        self.speculator.check(req)
        if req.request_id in self.requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use")
        prompt_ids = self.tokenize(req)
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty after tokenisation")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(prompt_ids)} tokens; the model's context is {self.max_model_len} tokens"
            )
        state = RequestState(req, prompt_ids)
        if req.resume:
            rebuild_tree(state, req.resume, self.fork_id, self.child_id, self._init_branch)
            if not state.live_branches():
                raise InvalidRequestError("resume: every branch has ended already")
        else:
            root = Branch(id=0, parent=None, depth=0, tokens=list(prompt_ids), own_start=len(prompt_ids))
            self._init_branch(state, root)
        self.requests[req.request_id] = state
        self.scheduler.add(state)

    def _init_branch(self, state: RequestState, br: Branch) -> None:
        req = state.request
        br.generator = make_generator(req.sampling.seed, stream_key(br.fork_path()))
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
        sched = self.scheduler.schedule(self.speculator.drafts(self.scheduler.running))
        for state, msg in sched.rejected:
            state.error = msg
            results.append(self._finish_request(state, "error"))
        if not sched.scheduled:
            return results
        batch = self.runner.prepare(sched)
        start = time.perf_counter()
        try:
            logits = self.runner.execute(batch)
        except Exception as exc:  # a failed forward must not take the other requests down
            log.exception("engine step failed")
            for state in sched.requests:
                state.error = f"engine step failed: {exc}"
                results.append(self._finish_request(state, "error"))
            return results
        self.speculator.cost.add(len(batch.input_ids), time.perf_counter() - start)
        self.num_steps += 1
        self.last_step_attended_tokens = batch.meta.attended_tokens
        self.scheduler.update_from_output(sched)
        if batch.rows:
            kept, last, finished = self.applier.apply(
                batch.rows, batch.first_row, batch.drafts, logits, results
            )
            self.generated_tokens += kept
            self.speculator.observe(batch.rows, last, self.runner.last_hidden)
            for state in finished:
                results.append(self._finish_request(state, self.rules.finish_reason(state)))
        return results

    def _expire_deadlines(self, results: list) -> None:
        now = time.monotonic()
        for state in list(self.requests.values()):
            if state.request.deadline is not None and now >= state.request.deadline:
                results.append(self._finish_request(state, "deadline"))

    # ---- results ------------------------------------------------------------------------

    def _finish_request(self, state: RequestState, reason: FinishReason) -> RequestOutput:
        for br in state.live_branches():
            br.finish_reason = reason
        state.finish_reason = state.finish_reason or reason
        state.finish_time = time.monotonic()
        self.scheduler.remove(state)
        self.requests.pop(state.request_id, None)
        return request_output(state, self._decode)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    # ---- conveniences -------------------------------------------------------------------

    def stats(self) -> EngineStats:
        sch = self.scheduler
        return EngineStats(
            running_requests=len(sch.running),
            waiting_requests=len(sch.waiting),
            running_branches=sch.num_running_branches(),
            free_blocks=self.kv.num_free,
            total_blocks=self.kv.num_blocks,
            prefix_hit_rate=self.kv.prefix_hit_rate,
            steps=self.num_steps,
            num_preemptions=sch.num_preemptions,
            generated_tokens=self.generated_tokens,
            spec_draft_tokens=self.speculator.draft_tokens,
            spec_accepted_tokens=self.speculator.accepted_tokens,
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
