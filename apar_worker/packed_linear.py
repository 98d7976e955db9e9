"""Linear layers with weights pre-packed for oneDNN (`EngineConfig.linear_kernel`), on CPU.

A decode step of 1-32 rows reads every weight once and does little arithmetic with it. Plain
`F.linear` on a CPU picks a GEMV for one row but a general GEMM from two rows on, which
re-reads and re-lays-out the weights per call: on SmolLM2's 1536x576 layers a 16-row product
costs 2-3x a 1-row one. oneDNN's matmul over weights reordered once at load time into its own
blocked layout (what inductor's CPU freezing does, `mkldnn._reorder_linear_weight`) runs
1-32 rows at close to the weight-read time. Results are float32 products like the plain
path's, with a different summation order (equal to ~1e-6 relative).

`"auto"` packs where it helps: float32 weights on a CPU whose torch has oneDNN, checked by a
probe, of a model the engine loaded itself; anywhere else (CUDA, fp16/bf16, int8 layers, a
model handed in by the caller, which may still be training: packing drops the plain weights)
it leaves the model as it is. `"plain"` never packs (the reference path); `"onednn"` packs
any model it is given and errors where it cannot.
"""

from __future__ import annotations

import torch
from torch import nn

from apar_worker.types import LINEAR_KERNELS, ModelLoadError

BATCH_HINT = 16  # rows oneDNN tunes the packed layout for; measured flat over 1-32 rows


def parse_linear_kernel(value: str | None) -> str:
    if value is None:
        return "auto"
    if value in LINEAR_KERNELS:
        return value
    raise ModelLoadError(f"unknown linear_kernel {value!r}; choose one of {', '.join(LINEAR_KERNELS)}")


class PackedLinear(nn.Module):
    """`nn.Linear` whose weight lives in oneDNN's blocked layout. The plain weight is kept only
    when asked (the output embedding, which draft heads and tied input embeddings read)."""

    def __init__(self, linear: nn.Linear, keep_weight: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
        self.packed_bytes = weight.numel() * weight.element_size()
        self.bias = linear.bias
        self.weight = linear.weight if keep_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn"


def onednn_error(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if packed oneDNN linears run here and agree with `F.linear`; else why not."""
    if device.type != "cpu":
        return f"packed oneDNN linears are a CPU path (model is on {device.type})"
    if dtype != torch.float32:
        return f"packed oneDNN linears are float32 only (model is {dtype})"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    try:
        lin = nn.Linear(64, 24)
        x = torch.linspace(-1, 1, 3 * 64).reshape(3, 64)
        err = (PackedLinear(lin)(x) - lin(x)).abs().max().item()
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None if err < 1e-4 else f"packed result is off by {err:.2g}"


def pack_model(model: nn.Module, kernel: str | None, *, owned: bool = True) -> int:
    """Swap the model's float `nn.Linear` layers for `PackedLinear` in place; returns how many.
    `auto` packs only an `owned` model where the probe passes, silently otherwise (a default)."""
    kernel = parse_linear_kernel(kernel)
    if kernel == "plain" or (kernel == "auto" and not owned):
        return 0
    param = next(model.parameters())
    problem = onednn_error(param.device, param.dtype)
    if problem is not None:
        if kernel == "onednn":
            raise ModelLoadError(f"linear_kernel onednn is unavailable: {problem}")
        return 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, PackedLinear(linear, keep_weight=linear is head))
    return len(targets)
