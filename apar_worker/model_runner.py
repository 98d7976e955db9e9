"""Loads a Hugging Face causal LM and runs one flattened engine step through it.

The HF model code is reused as is: only its attention is swapped for `apar_paged`, which
reads and writes the paged KV cache. Logits are computed only for the rows that sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from apar_worker.attention import ATTN_IMPLEMENTATION, FORWARD_CONTEXT, AttentionMetadata, SeqSlice
from apar_worker.kv_cache import KVCache
from apar_worker.lean_forward import LeanForward, lean_error
from apar_worker.model_registry import resolve_model
from apar_worker.types import ModelLoadError

if TYPE_CHECKING:
    from apar_worker.scheduler import SchedulerOutput
    from apar_worker.sequence import Branch, RequestState

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def parse_dtype(dtype: str) -> torch.dtype:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}") from None


def load_model_and_tokenizer(name_or_path: str, device: torch.device, dtype: torch.dtype):
    path: Path = resolve_model(name_or_path)
    hf_logging.disable_progress_bar()  # the CLI prints answers, not weight-loading bars
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, attn_implementation=ATTN_IMPLEMENTATION
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model from {path}: {exc}") from exc
    return model.to(device).eval(), tokenizer


@dataclass
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_model_len: int
    vocab_size: int


def model_shape(model: PreTrainedModel) -> ModelShape:
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    max_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048)
    return ModelShape(cfg.num_hidden_layers, kv_heads, head_dim, int(max_len), cfg.vocab_size)


@dataclass
class StepBatch:
    """One step's model inputs: every scheduled token flattened, with per-token positions."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    seqs: list[SeqSlice] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # flat index of each logits row
    rows: list[tuple[RequestState, Branch]] = field(default_factory=list)  # each branch that samples
    first_row: list[int] = field(default_factory=list)  # its first logits row (index into sample_rows)
    drafts: list[list[int]] = field(default_factory=list)  # its drafts: one more logits row each
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write before the forward
    meta: AttentionMetadata | None = None  # built by `execute`


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        kv_cache: KVCache,
        cascade_attention: bool = False,
        native=None,
        lean: bool = False,
    ) -> None:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.model = model.eval()
        self.kv_cache = kv_cache
        self.cascade_attention = cascade_attention  # shared prefixes attended once (apar_worker/cascade.py)
        self.native = native  # the C++ decode attention (apar_worker/native.py), or None: torch ops
        self.device = next(model.parameters()).device
        self.keep_hidden = False  # keep the sampled rows' last hidden states (draft heads read them)
        self.last_hidden: torch.Tensor | None = None  # [rows, H] of the last step, when kept
        # the lean forward where asked for and it applies (lean_forward.py), else HF's own
        self.lean = LeanForward(model, native) if lean and lean_error(model, native) is None else None

    @staticmethod
    def prepare(sched: SchedulerOutput) -> StepBatch:
        """Flatten the scheduled chunks of all branches into one sequence."""
        batch = StepBatch(copies=sched.copies)
        for sb in sched.scheduled:
            br, start, n = sb.branch, sb.start, sb.num_tokens
            offset = len(batch.input_ids)
            batch.input_ids.extend(br.tokens[start : start + sb.num_committed] + sb.draft)
            batch.positions.extend(range(start, start + n))
            batch.seqs.append(SeqSlice(offset, offset + n, br.block_table, start))
            if sb.sample:  # the last real token and every draft predict a token each
                batch.first_row.append(len(batch.sample_rows))
                batch.sample_rows.extend(range(offset + sb.num_committed - 1, offset + n))
                batch.rows.append((sb.request, br))
                batch.drafts.append(sb.draft)
        return batch

    @torch.no_grad()
    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Make the step's copy-on-write copies, run the forward; float32 logits [rows, vocab]."""
        self.kv_cache.copy_blocks(batch.copies)
        meta = AttentionMetadata.build(
            batch.seqs, self.kv_cache.block_size, self.device, self.cascade_attention, self.native is not None
        )
        batch.meta = meta
        ids = torch.tensor([batch.input_ids], dtype=torch.long, device=self.device)
        pos = torch.tensor([batch.positions], dtype=torch.long, device=self.device)
        keep = torch.tensor(batch.sample_rows, dtype=torch.long, device=self.device)
        FORWARD_CONTEXT.kv_cache = self.kv_cache
        FORWARD_CONTEXT.meta = meta
        FORWARD_CONTEXT.native = self.native
        try:
            if self.lean is None and not self.keep_hidden:
                out = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep)
                return out.logits[0].float()
            # the causal LM's forward, split where the output embedding reads the hidden states
            rows = self._hidden(ids, pos).index_select(0, keep)  # serial: `[keep]` opened an OpenMP region
            if self.keep_hidden:
                self.last_hidden = rows
            return self.model.get_output_embeddings()(rows).float()
        finally:
            FORWARD_CONTEXT.meta = None

    def _hidden(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden states [T, H] of the step's tokens."""
        if self.lean is not None:
            return self.lean.hidden(ids[0], pos[0])
        return self.model.base_model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0]
