"""A lean forward pass for Llama-style decoders on CPU, from the HF model's own modules.

HF's decoder layer runs some sixty torch ops and ten module calls around its seven matrix
products: RMSNorm alone is eight ops, rotary ten. At 1-64 rows each op costs microseconds of
dispatch, which on SmolLM2 was about a third of a step. This runs the same arithmetic with
one native call for each add + RMSNorm, rotary and SiLU-and-multiply (csrc/decoder_ops.cpp),
the model's own linear layers (packed or not, int8 or not) and the engine's paged attention.

It reads the HF modules at call time (no copied weights), so what the model holds is what
runs. Equal to HF's forward to float rounding (tests/test_lean_forward.py); the engine's
`lean_forward: false` keeps HF's forward, the reference path.
"""

from __future__ import annotations

import torch
from torch import nn

from apar_worker.attention import paged_attention

SUPPORTED = ("llama", "qwen2")


def lean_error(model: nn.Module, kernel) -> str | None:
    """None if `LeanForward` can run this model here; else why not."""
    if kernel is None or not hasattr(kernel, "add_rms_norm_"):
        return "the native kernels are not loaded"
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        return f"model type {cfg.model_type!r} is not one of {', '.join(SUPPORTED)}"
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "hidden_act", "silu") != "silu":
        return "sliding-window attention or a non-SiLU MLP"
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        return f"a float32 CPU path (model is {param.dtype} on {param.device.type})"
    body = getattr(model, "model", None)
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    if body is None or not all(hasattr(body, p) for p in parts):
        return "not a Llama-style decoder layout"
    return None


class LeanForward:
    def __init__(self, model: nn.Module, kernel) -> None:
        self.model = model
        self.body = model.model
        self.kernel = kernel

    def hidden(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden states [T, H] of flat token ids [T] at positions [T]."""
        k, body = self.kernel, self.body
        x = body.embed_tokens(ids)  # [T, H]; the residual stream, updated in place
        cos, sin = body.rotary_emb(x[None], position_ids=pos[None])
        cos, sin = cos[0].contiguous(), sin[0].contiguous()  # [T, D], once per step
        delta = None
        for layer in body.layers:
            norm = layer.input_layernorm
            h = k.add_rms_norm_(x, delta, norm.weight, norm.variance_epsilon)
            attn = self._attention(layer.self_attn, h, cos, sin)
            norm = layer.post_attention_layernorm
            h = k.add_rms_norm_(x, attn, norm.weight, norm.variance_epsilon)
            mlp = layer.mlp
            delta = mlp.down_proj(k.silu_mul(mlp.gate_proj(h), mlp.up_proj(h)))
        return k.add_rms_norm_(x, delta, body.norm.weight, body.norm.variance_epsilon)

    def _attention(
        self, attn: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        t, d = h.shape[0], attn.head_dim
        q = attn.q_proj(h).view(t, -1, d)
        key = attn.k_proj(h).view(t, -1, d)
        value = attn.v_proj(h).view(t, -1, d)
        self.kernel.rope_(q, cos, sin)
        self.kernel.rope_(key, cos, sin)
        # the HF attention interface's layout: [1, heads, T, D] (views, nothing copied)
        out, _ = paged_attention(
            attn,
            q.transpose(0, 1)[None],
            key.transpose(0, 1)[None],
            value.transpose(0, 1)[None],
            None,
            attn.scaling,
        )
        return attn.o_proj(out.reshape(t, -1))
