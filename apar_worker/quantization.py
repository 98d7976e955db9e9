"""Weight-only int8 linear layers (`EngineConfig.quantization = "int8"`), off by default.

A decode step of a few tokens reads every weight once and does little arithmetic with it, so
on a CPU it costs about the weight bytes over the memory bandwidth. Int8 weights are a quarter
of fp32's bytes. Each output channel has one symmetric scale (w ~= q * s, q in [-127, 127]);
the product runs in torch's packed kernel `aten._weight_int8pack_mm`, which dequantizes in
registers. Its fast CPU path takes bfloat16 activations (float32 and float16 ones run a scalar
loop, 5-20x slower), so inputs are cast to bfloat16 and outputs back to the model's dtype.

That kernel works in blocks of 4 rows and dequantizes the weights again for each block, so its
cost grows with the rows. Where bfloat16 matrix products are fast (AMX tiles, CUDA), a layer
also keeps its int8 values as a bfloat16 matrix (exact: |q| <= 127; 2 more bytes per weight)
and steps over `KERNEL_MAX_ROWS` rows multiply by that and scale the output: on SmolLM2 such a
step costs about a 1-row one. (Converting int8 to bfloat16 in every step instead costs more
than it saves.) The two paths round differently, so a row's logits depend slightly on how many
rows share its step (fp32 GEMMs' do too, less).

On a CPU with the engine's native kernels (float32 model, `native_kernels` on, `linear_kernel`
auto or native), layers are `NativeInt8Linear` instead: the int8 values as 16-column panels
for csrc/skinny_linear.cpp, which widens them to float32 in registers and keeps the rows in
float32 (no bfloat16 rounding). It reads each weight byte once per step at any row count, so a
1-token step costs about the int8 bytes over the memory bandwidth, and a row's result does
not depend on how many rows share its step.

Where the CPU has AMX tiles (Intel Xeon from Sapphire Rapids on; `linear_kernel` auto or amx),
the int8 values are stored as AMX B tiles instead and the rows are quantized per row in two
int8 levels (csrc/amx_linear.cpp): the products run on the tile unit at about 1000
multiply-adds a cycle, so from a few rows on a step no longer costs the FMAs of widening and
multiplying every weight per row. The rows keep about 2^-16 of their largest value (results
within ~4e-5 of the float32-row path, relative to the output's largest value).

Where the kernel is missing or fails on the model's device, `quantize_model` logs a warning
and leaves the model as it is (the plain path), so a config that asks for int8 still serves.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from apar_worker.native import native_module
from apar_worker.types import ModelLoadError

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8")
COMPUTE_DTYPE = torch.bfloat16  # the activation dtype of the kernel's vectorised CPU path
_K_MULTIPLE = 16  # the CPU kernel steps over K by 16 (AVX-512) with no tail: other K give garbage
KERNEL_MAX_ROWS = 4  # measured on SmolLM2's layers (AMX CPU): from 8 rows the bf16 matmul is faster


def fast_bf16_matmul(device: torch.device) -> bool:
    """Whether bfloat16 matrix products beat the int8 kernel for many rows: CUDA, AMX CPUs."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return device.type == "cuda" or (device.type == "cpu" and amx())


def parse_quantization(value: str | None) -> str | None:
    """None / "none" -> None (plain weights); "int8" -> "int8"; anything else is an error."""
    if value is None or value == "none":
        return None
    if value in QUANTIZATIONS:
        return value
    raise ModelLoadError(f"unknown quantization {value!r}; choose one of {', '.join(QUANTIZATIONS)}")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: returns (q [N, K] int8, scales [N] float32)."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights and per-channel scales; bias (if any) stays in full precision."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scales = quantize_weight(weight)
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE))
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)
        wide = q.to(torch.bfloat16) if fast_bf16_matmul(weight.device) else None
        self.register_buffer("weight_bf16", wide)  # the int8 values, for steps of many rows

    @classmethod
    def of(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] > KERNEL_MAX_ROWS and self.weight_bf16 is not None:
            y = F.linear(x2.to(torch.bfloat16), self.weight_bf16).float() * self.scales.float()
        else:  # a fresh contiguous copy: the kernel reads rows with aligned loads
            x2 = x2.to(COMPUTE_DTYPE, copy=True)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scales)
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


INT8_LAYOUTS = ("panels", "pairs", "amx")  # NativeInt8Linear's weight layouts, by kernel


class NativeInt8Linear(nn.Module):
    """Int8 weights in one of the native kernels' layouts, per-channel scales and bias in
    float32. `panels`: FMA panels [N/16, K, 16], float32 rows (skinny_linear.cpp); `pairs`:
    k-pair panels [N/16, K/2, 32], bfloat16 rows (bf16_rows.cpp); `amx`: AMX B tiles
    [N/16, K/4, 64], rows in two int8 levels (amx_linear.cpp)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, kernel, layout: str = "panels"
    ) -> None:
        super().__init__()
        if layout not in INT8_LAYOUTS:
            raise ValueError(f"unknown int8 layout {layout!r}; choose one of {', '.join(INT8_LAYOUTS)}")
        self.out_features, self.in_features = weight.shape
        qw, scales = quantize_weight(weight)
        self.layout = layout
        pack = {
            "panels": kernel.pack_panels,
            "pairs": kernel.pack_panels_pairs,
            "amx": kernel.pack_panels_amx,
        }
        self.panels = pack[layout](qw.contiguous())
        self.scales = scales.contiguous()
        self.bias = bias.detach().clone() if bias is not None else None
        self.packed_bytes = self.panels.numel() + self.scales.numel() * 4  # what a step reads

    @property
    def tiles(self) -> bool:
        return self.layout == "amx"

    @property
    def kernel(self):  # looked up, not held: a model holding it stays deep-copyable
        return native_module()

    @classmethod
    def of(cls, linear: nn.Linear, kernel, layout: str = "panels") -> NativeInt8Linear:
        return cls(linear.weight, linear.bias, kernel, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = self.kernel.skinny_linear(x2, self.panels, self.out_features, self.bias, self.scales)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        kind = {"panels": "native", "pairs": "bf16 rows", "amx": "amx"}[self.layout]
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, {kind}"


def native_int8_error(param: torch.Tensor, kernel, layout: str = "panels") -> str | None:
    """None if `NativeInt8Linear` in `layout` runs for this model and agrees with the
    dequantized product (of bfloat16-rounded rows for `pairs`)."""
    if kernel is None:
        return "the native kernels are not loaded"
    if param.device.type != "cpu" or param.dtype != torch.float32:
        return f"a float32 CPU path (model is {param.dtype} on {param.device.type})"
    if layout == "amx" and not kernel.amx_available():
        return "this CPU (or its OS) grants no AMX int8 tiles"
    if layout == "pairs" and not kernel.bf16_rows_available():
        return "this CPU (or this build) has no AVX512_BF16 for bfloat16 rows"
    try:
        w = torch.linspace(-1, 1, 40 * 24).reshape(40, 24)
        x = torch.linspace(-1, 1, 7 * 24).reshape(7, 24)
        layer = NativeInt8Linear(w, None, kernel, layout)
        qw, scales = quantize_weight(w)
        rows = x.bfloat16().float() if layout == "pairs" else x
        err = (layer(x) - rows @ (qw.float() * scales[:, None]).T).abs().max().item()
    except (RuntimeError, TypeError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None if err < 1e-3 else f"native int8 result is off by {err:.2g}"


def int8_layout(param: torch.Tensor, kernel, linear_kernel: str = "auto") -> str:
    """The layout int8 layers take: `auto` finds AMX tiles, else bfloat16 rows, else the FMA
    panels; `amx` and `bf16` insist (an error where they cannot run); any other `linear_kernel`
    keeps the panels (float32 rows)."""
    asked = {"amx": ("amx",), "bf16": ("pairs",), "auto": ("amx", "pairs")}.get(linear_kernel, ())
    for layout in asked:
        problem = native_int8_error(param, kernel, layout)
        if problem is None:
            return layout
        if linear_kernel != "auto":
            raise ModelLoadError(f"linear_kernel {linear_kernel} is unavailable: {problem}")
    return "panels"


def int8_kernel_error(device: torch.device) -> str | None:
    """None if `_weight_int8pack_mm` runs on `device` and agrees with a plain matmul (within
    int8's error); else why not. A probe, not a version check: builds differ per device."""
    try:
        w = torch.linspace(-1, 1, 32 * 64, device=device).reshape(32, 64)
        x = torch.linspace(-1, 1, 3 * 64, device=device).reshape(3, 64)
        ref = x @ w.T
        err = ((Int8Linear(w)(x) - ref).abs().max() / ref.abs().max()).item()
    except (RuntimeError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None if err < 0.02 else f"kernel result is off by {err:.1%}"


def _eligible(module: nn.Module, skip: set[int], native: bool) -> bool:
    if not isinstance(module, nn.Linear) or id(module) in skip:
        return False
    return native or module.in_features % _K_MULTIPLE == 0


def quantize_model(
    model: nn.Module, quantization: str | None, *, lm_head: bool = True, kernel=None, layout: str = "panels"
) -> int:
    """Swap the model's `nn.Linear` layers for `Int8Linear` in place; returns how many.

    `lm_head=True` also quantizes the output projection. When it is tied to the input
    embeddings (SmolLM2), the layer gets its own int8 copy and the embedding table stays as is.
    A layer whose input width the kernel cannot take is left in full precision. `kernel` (the
    native module) makes the layers `NativeInt8Linear` where it runs for this model, in `layout`
    (the caller's choice: `int8_layout`).
    """
    if parse_quantization(quantization) is None:
        return 0
    param = next(model.parameters())
    device = param.device
    native = kernel is not None and native_int8_error(param, kernel, layout) is None
    problem = None if native else int8_kernel_error(device)
    if problem is not None:
        log.warning("int8 weights unavailable on %s (%s); serving the unquantized model", device, problem)
        return 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(head)} if head is not None and not lm_head else set()
    targets = [(n, m) for n, m in model.named_modules() if _eligible(m, skip, native)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(
            parent, attr, NativeInt8Linear.of(linear, kernel, layout) if native else Int8Linear.of(linear)
        )
    if not targets:
        log.warning("int8: the model has no nn.Linear layers the kernel can take; nothing quantized")
    return len(targets)
