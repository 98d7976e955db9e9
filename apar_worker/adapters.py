"""LoRA adapters plus new token rows: how a small shipped delta becomes a full model.

A shipped APAR model built on a pretrained base carries only what training changed: low-rank
updates of the linear layers and the embedding rows of the tokens it added (`[Fork]`,
`[Child]`). `merge_into` folds both into a base model's weights, so serving runs a plain
checkpoint with no adapter overhead; `LoRALinear` is the unmerged form used in training.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class AdapterConfig:
    base: str  # base model name (see base_models.BASE_MODELS) or directory
    r: int = 16
    alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    base_vocab_size: int = 0  # rows of the base embedding; rows past it are new tokens
    vocab_size: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen and B starting at zero (so y starts as W x)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)
        base.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


def apply_lora(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Freeze the model and wrap every targeted linear layer; returns the wrapped module paths."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in cfg.targets:
                setattr(module, child_name, LoRALinear(child, cfg.r, cfg.alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no linear layer named any of {cfg.targets} in the model")
    return wrapped


def token_row_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The per-token weight matrices: the embedding, and the LM head unless it is tied to it."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    out = {"new_token_rows": emb}
    if head is not None and head.weight is not emb:
        out["new_head_rows"] = head.weight
    return out


def train_new_rows(model: nn.Module, first_new: int) -> list[nn.Parameter]:
    """Make only rows >= first_new of the token matrices learn (a gradient mask on each)."""
    params = list(token_row_weights(model).values())
    for w in params:
        w.requires_grad_(True)
        mask = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
        mask[first_new:] = 1
        w.register_hook(lambda g, m=mask: g * m)
    return params


def adapter_state(model: nn.Module, cfg: AdapterConfig) -> dict[str, torch.Tensor]:
    """The tensors a shipped adapter holds: LoRA factors and the new embedding rows."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{name}.lora_A"] = module.lora_A.detach().cpu().clone()
            out[f"{name}.lora_B"] = module.lora_B.detach().cpu().clone()
    for key, w in token_row_weights(model).items():
        out[key] = w[cfg.base_vocab_size :].detach().cpu().clone()  # not a view of all rows
    return out


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], cfg: AdapterConfig) -> None:
    """Inverse of `adapter_state` on a model that already has LoRA applied (resuming training)."""
    modules = dict(model.named_modules())
    rows = token_row_weights(model)
    with torch.no_grad():
        for key, value in state.items():
            if key in rows:
                rows[key][cfg.base_vocab_size :].copy_(value)
                continue
            path, _, part = key.rpartition(".")
            getattr(modules[path], part).copy_(value)


def save_adapter(
    out_dir: Path, state: dict[str, torch.Tensor], cfg: AdapterConfig, dtype=torch.float16
) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype) for k, v in state.items()}, str(out_dir / ADAPTER_WEIGHTS))
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(asdict(cfg), indent=2) + "\n")


def load_adapter(adapter_dir: Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg = AdapterConfig(**json.loads((adapter_dir / ADAPTER_CONFIG).read_text()))
    return cfg, load_file(str(adapter_dir / ADAPTER_WEIGHTS))


@torch.no_grad()
def merge_into(model: nn.Module, state: dict[str, torch.Tensor], cfg: AdapterConfig) -> None:
    """Fold the adapter into a plain base model: W += scale * B @ A; append the new token rows."""
    if model.get_input_embeddings().weight.shape[0] != cfg.base_vocab_size:
        raise ValueError(
            f"base has {model.get_input_embeddings().weight.shape[0]} embedding rows, "
            f"the adapter was trained on {cfg.base_vocab_size}"
        )
    model.resize_token_embeddings(cfg.vocab_size, mean_resizing=False)
    for key, w in token_row_weights(model).items():
        if key not in state:
            raise ValueError(f"the adapter lacks {key} (trained on a model with other tied weights)")
        w[cfg.base_vocab_size :] = state[key].to(w.dtype)
    modules = dict(model.named_modules())
    for key, a in state.items():
        if not key.endswith(".lora_A"):
            continue
        path = key[: -len(".lora_A")]
        b = state[f"{path}.lora_B"]
        layer = modules[path]
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{path} is not a linear layer in the base model")
        layer.weight += (b.float() @ a.float()).to(layer.weight.dtype) * cfg.scale
    model.tie_weights()
