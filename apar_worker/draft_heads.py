"""Draft heads (Medusa-style): guess the tokens after the next one from the last hidden state.

Head k maps the hidden state h at position t to h + SiLU(W_k h + b_k) and reads it with the
model's own output embedding, restricted to a draft vocabulary (the tokens the model says most
often: a full-vocabulary read per head would cost as much as a tenth of a step here). Head k
guesses the token at t + 2 + k: after a step, the heads run on the row that produced a branch's
last token, and their guesses are its drafts for the next step. Zero-initialised heads are the
identity, so they start out guessing the next token again; `apar train --draft-heads` fits them
on the model's own answers (apar_train/draft_heads.py). The file is small (~1 M parameters).

In the engine the heads' guesses give way to a prompt-lookup match where the branch's context has
one (`lookup`): a copied span is right far more often than a head's guess (36 % for the first head
of apar-smol's), and where nothing repeats the heads still draft.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from apar_worker.model_registry import adapter_of
from apar_worker.sequence import Branch, RequestState
from apar_worker.speculative import ngram_lookup
from apar_worker.types import ModelLoadError

HEADS_FILE = "draft_heads.safetensors"
# A head's guess is drafted only while it (and every head before it) puts at least this much
# probability on it: a low-confidence guess is mostly rejected, and each draft costs a row.
MIN_CONFIDENCE = 0.3


class DraftHeads(torch.nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, vocab: torch.Tensor) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(hidden_size, hidden_size) for _ in range(num_heads))
        for blk in self.blocks:
            torch.nn.init.zeros_(blk.weight)
            torch.nn.init.zeros_(blk.bias)
        self.register_buffer("vocab", vocab.long())  # draft vocabulary: token ids the heads may guess

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def states(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, H] -> [num_heads, R, H]."""
        return torch.stack([hidden + F.silu(blk(hidden)) for blk in self.blocks])

    def logits(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """[num_heads, R, len(vocab)] over the draft vocabulary; `embedding` [V, H] is the model's."""
        return self.states(hidden) @ embedding[self.vocab].T

    @torch.no_grad()
    def guess(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """[R, num_heads] token ids: each head's top guess."""
        return self.guess_with_confidence(hidden, embedding)[0]

    @torch.no_grad()
    def guess_with_confidence(
        self, hidden: torch.Tensor, embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([R, num_heads] token ids, [R, num_heads] the heads' softmax probability of each)."""
        return self.guess_over(hidden, embedding[self.vocab])

    @torch.no_grad()
    def guess_over(
        self, hidden: torch.Tensor, draft_matrix: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """guess_with_confidence given the embedding's draft-vocabulary rows, gathered once by
        the caller rather than every step."""
        states = self.states(hidden.to(draft_matrix.dtype))
        probs = (states @ draft_matrix.T).float().softmax(-1)
        best, idx = probs.max(-1)
        return self.vocab[idx].T, best.T

    def save(self, path: Path, meta: dict) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        info = {"num_heads": self.num_heads, "hidden_size": self.blocks[0].in_features, **meta}
        save_file(tensors, str(path), metadata={"apar_draft_heads": json.dumps(info)})

    @classmethod
    def load(cls, path: Path) -> DraftHeads:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                info = json.loads((f.metadata() or {})["apar_draft_heads"])
            tensors = load_file(str(path))
            heads = cls(info["hidden_size"], info["num_heads"], tensors["vocab"])
            heads.load_state_dict(tensors)
        except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as exc:
            raise ModelLoadError(f"cannot load draft heads from {path}: {exc}") from exc
        return heads.eval()


class DraftHeadsProposer:
    """Keeps each branch's guesses from the step that just ran; proposes them next step, unless
    `lookup` (prompt_lookup_min, max) finds the context's last tokens earlier in it."""

    def __init__(self, heads: DraftHeads, model, lookup: tuple[int, int] | None = None) -> None:
        self.heads = heads
        # the draft vocabulary's rows of the output embedding, gathered once (a step reads them)
        matrix = output_matrix(model)
        self.draft_matrix = matrix[heads.vocab.to(matrix.device)].contiguous()
        self.lookup = lookup
        self.guesses: dict[int, tuple[int, list[int]]] = {}  # id(branch) -> (len(tokens), guesses)

    def observe(self, rows: list[tuple[RequestState, Branch]], hidden: torch.Tensor) -> None:
        """`hidden` [len(rows), H]: the state that produced each row's branch's last token."""
        self.guesses.clear()
        if not rows:
            return
        ids, conf = self.heads.guess_over(hidden, self.draft_matrix)
        sure = (conf >= MIN_CONFIDENCE).int().cumprod(dim=1).sum(dim=1).tolist()  # leading confident heads
        for (_, br), g, n in zip(rows, ids.tolist(), sure, strict=True):
            self.guesses[id(br)] = (len(br.tokens), g[:n])

    def propose(self, state: RequestState, br: Branch, k: int) -> list[int]:
        if self.lookup is not None:
            copied = ngram_lookup(br.tokens, k, *self.lookup)
            if copied:
                return copied
        got = self.guesses.get(id(br))
        if got is None or got[0] != len(br.tokens):
            return []
        return got[1][:k]


def output_matrix(model) -> torch.Tensor:
    """[V, H] float weights of the model's output embedding (the tied input one when the head
    itself was quantized)."""
    weight = getattr(model.get_output_embeddings(), "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point:
        return weight
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return model.get_input_embeddings().weight
    raise ModelLoadError("draft heads need the model's float output embedding")


def find_heads(model_dir: Path | None, configured: str | None) -> Path | None:
    """The heads file: the configured path, else the model directory's own (None: none)."""
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise ModelLoadError(f"draft heads file {path} does not exist")
        return path
    if model_dir is None:
        return None
    for where in (model_dir, adapter_of(model_dir)):
        if where is not None and (where / HEADS_FILE).is_file():
            return where / HEADS_FILE
    return None


def load_proposer(
    model, model_dir: Path | None, configured: str | None, lookup: tuple[int, int] | None = None
) -> DraftHeadsProposer | None:
    path = find_heads(model_dir, configured)
    if path is None:
        return None
    heads = DraftHeads.load(path)
    weight = output_matrix(model)
    if heads.blocks[0].in_features != weight.shape[1]:
        raise ModelLoadError(
            f"draft heads {path} are for hidden size {heads.blocks[0].in_features}, not {weight.shape[1]}"
        )
    return DraftHeadsProposer(heads.to(weight.device, weight.dtype), model, lookup)
