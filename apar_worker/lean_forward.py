"""A lean forward pass for Llama-style decoders on CPU, from the HF model's own modules.

HF's decoder layer runs some sixty torch ops and ten module calls around its seven matrix
products: RMSNorm alone is eight ops, rotary ten. At 1-64 rows each op costs microseconds of
dispatch, which on SmolLM2 was about a third of a step. This runs the same arithmetic with
one native call for each add + RMSNorm, rotary and SiLU-and-multiply (csrc/decoder_ops.cpp),
the model's own linear layers (packed or not, int8 or not) and the engine's paged attention.
Where the linears hold native panels, q/k/v and gate/up each run as one product over their
panels laid end to end (the layers' own panels become views of it: no second copy).

It reads the HF modules at call time (no copied weights), so what the model holds is what
runs. Equal to HF's forward to float rounding (tests/test_lean_forward.py); the engine's
`lean_forward: false` keeps HF's forward, the reference path.
"""

from __future__ import annotations

import torch
from torch import nn

from apar_worker.attention import FORWARD_CONTEXT, paged_attention
from apar_worker.packed_linear import NativeLinear
from apar_worker.quantization import NativeInt8Linear

SUPPORTED = ("llama", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # rotary types that depend on the position alone
ROPE_TABLE_MAX = 16384  # positions whose cos/sin LeanForward keeps (SmolLM2: 8192 x 64 x 2 floats, 4 MB)


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


class Fused:
    """Linear layers of one input run as one native product: their panels end to end (float32
    or int8 panels, the latter with their scales)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.panels = torch.cat([m.panels for m in layers])
        self.n = sum(m.out_features for m in layers)
        biases = [m.bias for m in layers]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        int8 = isinstance(layers[0], NativeInt8Linear)
        self.scales = torch.cat([m.scales for m in layers]) if int8 else None
        self.kernel = layers[0].kernel
        start = 0
        for m in layers:  # each layer reads its part of the fused panels from now on
            m.panels = self.panels[start : start + m.panels.shape[0]]
            start += m.panels.shape[0]

    @staticmethod
    def of(layers: list[nn.Module]) -> Fused | None:
        """Fused layers where all are native, panel-aligned and alike in bias; else None."""
        kinds = {type(m) for m in layers}
        if len(kinds) != 1 or not kinds <= {NativeLinear, NativeInt8Linear}:
            return None
        if any(m.out_features % 16 for m in layers):
            return None
        if len({m.bias is None for m in layers}) != 1:
            return None
        return Fused(layers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.skinny_linear(x, self.panels, self.n, self.bias, self.scales)


_NONE = torch.empty(0)  # an absent bias or scales, for the C++ layer


def _parts(m: Fused | nn.Module) -> list[torch.Tensor]:
    """panels, bias, scales of a fused or native linear, as decoder_layer reads them."""
    bias, scales = m.bias, getattr(m, "scales", None)
    return [m.panels, _NONE if bias is None else bias.detach(), _NONE if scales is None else scales]


class LeanForward:
    def __init__(self, model: nn.Module, kernel) -> None:
        self.model = model
        self.body = model.model
        self.kernel = kernel
        self.fused: dict[int, Fused | None] = {}  # by id of the attention or MLP module
        for layer in self.body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.fused[id(attn)] = Fused.of([attn.q_proj, attn.k_proj, attn.v_proj])
            self.fused[id(mlp)] = Fused.of([mlp.gate_proj, mlp.up_proj])
        # all-decode steps run each layer as one C++ call where every linear is native panels
        self.layer_weights = self._layer_weights()
        self.rope = self._rope_table()
        self.native_steps = 0  # steps that ran the C++ layers (tests, profiles)

    def _layer_weights(self) -> list[list[torch.Tensor]] | None:
        out, native = [], (NativeLinear, NativeInt8Linear)
        for layer in self.body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            fa, fm = self.fused[id(attn)], self.fused[id(mlp)]
            if (
                fa is None
                or fm is None
                or not all(isinstance(m, native) for m in (attn.o_proj, mlp.down_proj))
            ):
                return None
            norms = layer.input_layernorm, layer.post_attention_layernorm
            weights = [norms[0].weight.detach(), *_parts(fa), *_parts(attn.o_proj), norms[1].weight.detach()]
            out.append([*weights, *_parts(fm), *_parts(mlp.down_proj)])
        cfg, attn = self.model.config, self.body.layers[0].self_attn
        self.dims = [cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim, cfg.intermediate_size]
        self.eps, self.scale = self.body.layers[0].input_layernorm.variance_epsilon, attn.scaling
        return out

    def _rope_table(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos and sin [P, D] of the first positions, from the model's own rotary module, once:
        per step HF's computes them with torch.cos/sin, whose MKL kernels open an OpenMP region
        even for a few rows, and its threads then spin beside the kernels' pool. None for rotary
        types that change with the sequence length (dynamic, longrope: transformers' own
        `dynamic_rope_update`)."""
        rot = self.body.rotary_emb
        if getattr(rot, "rope_type", "default") not in STATIC_ROPE:
            return None
        n = min(int(getattr(self.model.config, "max_position_embeddings", 0) or 0), ROPE_TABLE_MAX)
        if n <= 0:
            return None
        probe = torch.empty(1, 1, dtype=torch.float32)  # its dtype and device are what rotary reads
        with torch.no_grad():
            cos, sin = rot(probe, position_ids=torch.arange(n)[None])
        return cos[0].contiguous(), sin[0].contiguous()

    def _cos_sin(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope is not None and int(pos.max()) < self.rope[0].shape[0]:
            return self.rope[0].index_select(0, pos), self.rope[1].index_select(0, pos)
        cos, sin = self.body.rotary_emb(x[None], position_ids=pos[None])
        return cos[0].contiguous(), sin[0].contiguous()  # [T, D], once per step

    def _plan(self, t: int) -> tuple | None:
        """decoder_layer's attention arguments for this step, or None unless every query token
        is a native item (no prefill rows, which take the Python path)."""
        meta, cache = FORWARD_CONTEXT.meta, FORWARD_CONTEXT.kv_cache
        if self.layer_weights is None or FORWARD_CONTEXT.native is None or cache is None:
            return None
        if meta is None or meta.nat_tables is None or meta.long:
            return None
        tok = meta.nat_tok
        if isinstance(tok, slice):
            tok = None if tok == slice(0, t) else torch.arange(tok.start, tok.stop)
        groups, keys = [], []
        for g in meta.dec_groups or ():
            q_sel = g.q_sel if torch.is_tensor(g.q_sel) else torch.arange(g.q_sel.start, g.q_sel.stop)
            groups += [q_sel, g.blocks, g.row_idx]
            keys.append(g.num_blocks * cache.block_size)
        return cache, (meta.slot_mapping, tok, meta.nat_tables, meta.nat_keys, groups, keys, self.scale)

    def hidden(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden states [T, H] of flat token ids [T] at positions [T]."""
        k, body = self.kernel, self.body
        x = body.embed_tokens(ids)  # [T, H]; the residual stream, updated in place
        cos, sin = self._cos_sin(x, pos)
        delta = None
        plan = self._plan(x.shape[0])
        if plan is not None:
            self.native_steps += 1
            cache, args = plan
            for i, layer in enumerate(body.layers):
                kv = cache.layer(layer.self_attn.layer_idx)
                delta = k.decoder_layer(
                    x, delta, self.layer_weights[i], self.dims, self.eps, cos, sin, *kv, *args
                )
            return k.add_rms_norm_(x, delta, body.norm.weight, body.norm.variance_epsilon)
        for layer in body.layers:
            norm = layer.input_layernorm
            h = k.add_rms_norm_(x, delta, norm.weight, norm.variance_epsilon)
            attn = self._attention(layer.self_attn, h, cos, sin)
            norm = layer.post_attention_layernorm
            h = k.add_rms_norm_(x, attn, norm.weight, norm.variance_epsilon)
            delta = self._mlp(layer.mlp, h)
        return k.add_rms_norm_(x, delta, body.norm.weight, body.norm.variance_epsilon)

    def _attention(
        self, attn: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        t, d = h.shape[0], attn.head_dim
        fused = self.fused.get(id(attn))
        if fused is not None:  # one product; q, k and v are column views of it
            qkv = fused(h)
            nq, nkv = attn.q_proj.out_features, attn.k_proj.out_features
            q = qkv[:, :nq].view(t, -1, d)
            key = qkv[:, nq : nq + nkv].view(t, -1, d)
            value = qkv[:, nq + nkv :].view(t, -1, d)
        else:
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

    def _mlp(self, mlp: nn.Module, h: torch.Tensor) -> torch.Tensor:
        fused = self.fused.get(id(mlp))
        if fused is None:
            return mlp.down_proj(self.kernel.silu_mul(mlp.gate_proj(h), mlp.up_proj(h)))
        gate_up = fused(h)
        inter = mlp.gate_proj.out_features
        return mlp.down_proj(self.kernel.silu_mul(gate_up[:, :inter], gate_up[:, inter:]))
