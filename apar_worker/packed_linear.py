"""Linear layers with weights pre-packed for oneDNN (`EngineConfig.linear_kernel`), on CPU.

A decode step of 1-32 rows reads every weight once and does little arithmetic with it. Plain
`F.linear` on a CPU picks a GEMV for one row but a general GEMM from two rows on, which
re-reads and re-lays-out the weights per call: on SmolLM2's 1536x576 layers a 16-row product
costs 2-3x a 1-row one. oneDNN's matmul over weights reordered once at load time into its own
blocked layout (what inductor's CPU freezing does, `mkldnn._reorder_linear_weight`) runs
1-32 rows at close to the weight-read time. Results are float32 products like the plain
path's, with a different summation order (equal to ~1e-6 relative).

`"native"` goes one step further: the engine's own C++ kernel (csrc/skinny_linear.cpp, built
with the attention kernel by native.py) streams weights stored as 16-column panels once per
step and multiplies them with the step's rows in registers; on SmolLM2 it cuts a 1-token step
by about a fifth against oneDNN (see the README's step-cost figures).

`"auto"` packs where it helps: float32 weights on a CPU, of a model the engine loaded itself,
with the native kernel where it built (and passes a probe), else oneDNN where torch has it;
anywhere else (CUDA, fp16/bf16, int8 layers, a model handed in by the caller, which may still
be training: packing drops the plain weights) it leaves the model as it is. `"plain"` never
packs (the reference path); `"onednn"` and `"native"` pack any model they are given and error
where they cannot. `"amx"` (opt-in, where the CPU has AMX tiles; an error elsewhere) stores
float32 weights as bfloat16 hi + lo tiles for csrc/amx_linear.cpp, whose products keep 16 of
float32's 24 significant bits per operand (results within ~1e-5 of float32's): a step then costs
the weight read at any row count up to 16, where the FMA panels pay 16 rows of multiply-adds.
Int8 layers go on AMX tiles under `auto` too (quantization.py).
"""

from __future__ import annotations

import torch
from torch import nn

from apar_worker.native import native_module
from apar_worker.types import LINEAR_KERNELS, ModelLoadError

BATCH_HINT = 16  # rows oneDNN tunes the packed layout for; measured flat over 1-32 rows


def parse_linear_kernel(value: str | None) -> str:
    if value is None:
        return "auto"
    if value in LINEAR_KERNELS:
        return value
    raise ModelLoadError(f"unknown linear_kernel {value!r}; choose one of {', '.join(LINEAR_KERNELS)}")


class _Packed(nn.Module):
    """`nn.Linear` whose weight lives in some kernel's own layout. The plain weight is kept only
    when asked (the output embedding, which draft heads and tied input embeddings read)."""

    KIND = ""

    def __init__(self, linear: nn.Linear, keep_weight: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_bytes = linear.weight.numel() * linear.weight.element_size()
        self.bias = linear.bias
        self.weight = linear.weight if keep_weight else None

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.matmul(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.KIND}"


class PackedLinear(_Packed):
    """The weight in oneDNN's blocked layout."""

    KIND = "onednn"

    def __init__(self, linear: nn.Linear, keep_weight: bool = False) -> None:
        super().__init__(linear, keep_weight)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")


class NativeLinear(_Packed):
    """The weight as the native kernel's 16-column panels (csrc/skinny_linear.cpp), or with
    `tiles` as AMX bfloat16 hi/lo tiles (csrc/amx_linear.cpp)."""

    KIND = "native"

    def __init__(self, linear: nn.Linear, kernel, keep_weight: bool = False, tiles: bool = False) -> None:
        super().__init__(linear, keep_weight)
        self.kernel = kernel
        self.KIND = "amx" if tiles else "native"
        pack = kernel.pack_panels_amx if tiles else kernel.pack_panels
        self.panels = pack(linear.weight.detach().contiguous())

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return self.kernel.skinny_linear(x2, self.panels, self.out_features, self.bias)


def _probe(make) -> str | None:
    """None if a layer built by `make(linear)` agrees with `F.linear`; else why not."""
    try:
        lin = nn.Linear(64, 24)
        x = torch.linspace(-1, 1, 3 * 64).reshape(3, 64)
        err = (make(lin)(x) - lin(x)).abs().max().item()
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None if err < 1e-4 else f"packed result is off by {err:.2g}"


def native_error(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the native linear kernel runs here and agrees with `F.linear`; else why not."""
    if device.type != "cpu" or dtype != torch.float32:
        return f"native linears are a float32 CPU path (model is {dtype} on {device.type})"
    kernel = native_module()
    if kernel is None:
        return "the native kernels did not build (see the warning above)"
    return _probe(lambda lin: NativeLinear(lin, kernel))


def amx_error(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if float32 layers run on AMX tiles here and agree with `F.linear`; else why not."""
    problem = native_error(device, dtype)
    if problem is None and not native_module().amx_available():
        problem = "this CPU (or its OS) grants no AMX tiles"
    return problem or _probe(lambda lin: NativeLinear(lin, native_module(), tiles=True))


def onednn_error(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if packed oneDNN linears run here and agree with `F.linear`; else why not."""
    if device.type != "cpu":
        return f"packed oneDNN linears are a CPU path (model is on {device.type})"
    if dtype != torch.float32:
        return f"packed oneDNN linears are float32 only (model is {dtype})"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    return _probe(PackedLinear)


def choose_kernel(kernel: str | None, param: torch.Tensor, owned: bool, native_ok: bool) -> str:
    """The kernel `pack_model` uses: `auto` picks native, then oneDNN, then plain, silently (a
    default); `native` and `onednn` error where they cannot run."""
    kernel = parse_linear_kernel(kernel)
    if kernel == "plain" or (kernel == "auto" and not owned):
        return "plain"
    # bf16 is int8's (quantization.py): the float layers int8 leaves (if any) take the panels
    checks = {"native": native_error, "onednn": onednn_error, "amx": amx_error, "bf16": native_error}
    order = (kernel,) if kernel != "auto" else ("native", "onednn") if native_ok else ("onednn",)
    for name in order:
        problem = checks[name](param.device, param.dtype)
        if problem is None:
            return name
        if kernel != "auto":
            raise ModelLoadError(f"linear_kernel {kernel} is unavailable: {problem}")
    return "plain"


def pack_model(model: nn.Module, kernel: str | None, *, owned: bool = True, native_ok: bool = True) -> str:
    """Swap the model's float `nn.Linear` layers for packed ones in place; returns the kernel
    used (`plain`: none swapped). `native_ok=False` keeps `auto` off the native kernel (the
    engine's `native_kernels: false`)."""
    chosen = choose_kernel(kernel, next(model.parameters()), owned, native_ok)
    if chosen == "plain":
        return chosen
    kernel_module = native_module() if chosen in ("native", "amx", "bf16") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        keep = linear is head
        if kernel_module is None:
            packed = PackedLinear(linear, keep)
        else:
            packed = NativeLinear(linear, kernel_module, keep, tiles=chosen == "amx")
        setattr(parent, attr, packed)
    return chosen
