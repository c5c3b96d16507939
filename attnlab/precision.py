"""Numeric precision: the frozen base's storage dtype, the compute dtype of training, and the rules
that keep training exact where it matters.

    model_dtype: auto | bf16 | fp16 | fp32     (top level of a config; `load_backbone(dtype=...)`)
    train: {mixed_precision: bf16 | fp16 | no} (default: follow the base's dtype)

`auto` is bf16 on a CUDA GPU that supports it (fp16 on one that does not) and fp32 on CPU. On CPU a
bf16 base is allowed with a one-line warning (it is far slower than fp32 on the 2-core machine
the results were made on, but it runs, and the tiny test models use it); fp16 on CPU is refused
(no fast kernels, and Accelerate's loss scaler needs a GPU).

Mixed precision, as the trainer does it:
  * plug-in parameters are fp32 master weights (upcast before the optimizer is built, whatever the
    base's dtype), so AdamW's update is not rounded to 8 bits of mantissa;
  * forward passes run under `torch.autocast(device, dtype)`: matmuls in bf16/fp16 against the
    frozen base's bf16/fp16 weights, reductions autocast keeps in fp32;
  * the loss (cross-entropy, KL) is taken on fp32 logits, and the step's loss is summed in fp32;
  * fp16 only: a dynamic loss scaler (torch.amp.GradScaler); a step whose scaled gradients
    overflow is skipped, as every fp16 trainer does, rather than stopping training. The scaler's
    state is not saved in checkpoints: a resumed fp16 run starts again from the initial scale.
The autocast is torch's own, not Accelerate's `mixed_precision=`: Accelerate keeps one
mixed-precision setting per process (its AcceleratorState cannot change once set), and one
experiment process trains fp32 and bf16 runs side by side in tests and sweeps.

A bf16 base evaluated after training runs under the same autocast (`autocast_for`), so a plug-in's
fp32 weights and the base's bf16 activations meet inside autocast, never as a dtype error.

Subnormal floats (|x| < 1.2e-38 in fp32) cost hundreds of times more per operation than normal ones on
x86 CPUs (an fp32 matmul of subnormals against the same of normal numbers: benchmarks/subnormal_cost.py).
A diverging run (a softmax over 49k vocabulary entries whose scores spread by hundreds) fills its tensors
with them and slows down. `flush_subnormals()` (called once by the `attnlab` command) sets them
to zero: it changes only values below 1.2e-38, far under fp32's rounding of any number a loss depends on.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch import nn

from .errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIXED = ("bf16", "fp16", "no")
CPU_SLOW = "far slower than fp32 on a CPU without fast bf16 matmul"


def flush_subnormals() -> bool:
    """Flush subnormal floats to zero on this CPU (see the module docstring); False where unsupported."""
    return torch.set_flush_denormal(True)


def resolve_model_dtype(name: str | None, device: str | torch.device | None = None,
                        where: str = "model_dtype") -> torch.dtype:
    """The base's storage dtype for `name` (auto / bf16 / fp16 / fp32 / None = auto) on `device`
    (None: CUDA when available)."""
    name = "auto" if name is None else name
    if name != "auto" and name not in DTYPES:
        raise ConfigError(f"{where}: {name!r} is not one of ['auto', 'bf16', 'fp16', 'fp32']")
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if name == "auto":
        if not cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype = DTYPES[name]
    if not cuda:
        check_cpu(dtype, where)
    return dtype


def check_cpu(dtype: torch.dtype, where: str) -> None:
    """fp16 on CPU is refused; bf16 on CPU is warned about in one line."""
    if dtype == torch.float16:
        raise ConfigError(f"{where}: fp16 needs a CUDA GPU; on CPU use fp32 (or bf16, {CPU_SLOW})")
    if dtype == torch.bfloat16:
        warnings.warn(f"{where}: bf16 on CPU is {CPU_SLOW}; use fp32 unless the model is tiny", stacklevel=3)


def as_mixed(where: str, v) -> str | None:
    """train.mixed_precision: None (follow the base's dtype) or one of bf16 / fp16 / no."""
    if v is None or v in MIXED:
        return v
    raise ConfigError(f"{where}: {v!r} is not one of {list(MIXED)} (or leave it out: the base's dtype decides)")


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the frozen base stores its floating-point weights in."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad),
                torch.float32)


def compute_dtype(model: nn.Module, mixed_precision: str | None) -> torch.dtype | None:
    """The autocast dtype for training `model` (None: no autocast, plain fp32). A bf16/fp16 base
    cannot be trained with mixed_precision `no` (its activations are bf16/fp16 whatever the setting)."""
    stored = base_dtype(model)
    low = {v: k for k, v in DTYPES.items()}.get(stored) if stored != torch.float32 else None
    if mixed_precision is None:
        mixed_precision = low or "no"
    if mixed_precision == "no":
        if low:
            raise ConfigError(f"train.mixed_precision: no, but the base is stored in {low}: set mixed_precision: {low} "
                              f"(fp32 plug-in weights, {low} compute) or load the base with model_dtype: fp32")
        return None
    if low and low != mixed_precision:
        raise ConfigError(f"train.mixed_precision: {mixed_precision}, but the base is stored in {low}; use "
                          f"mixed_precision: {low}, or model_dtype: {mixed_precision}")
    dtype = DTYPES[mixed_precision]
    if _device(model).type != "cuda":
        check_cpu(dtype, "train.mixed_precision")
    return dtype


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(model: nn.Module, dtype: torch.dtype | None):
    """torch.autocast on the model's device to `dtype`; a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device(model).type, dtype=dtype)


def autocast_for(model: nn.Module):
    """The autocast a base stored in bf16/fp16 needs for inference with fp32 plug-in weights
    attached (a no-op for an fp32 base)."""
    stored = base_dtype(model)
    return autocast(model, stored if stored != torch.float32 else None)


def in_base_precision(fn):
    """Decorate fn(bb, ...) (bb: a Backbone) to run under `autocast_for(bb.model)`."""
    @functools.wraps(fn)
    def run(bb, *args, **kwargs):
        with autocast_for(bb.model):
            return fn(bb, *args, **kwargs)
    return run


def master_weights(params: dict[str, nn.Parameter]) -> None:
    """Upcast bf16/fp16 plug-in parameters to fp32 in place (the same Parameter objects)."""
    with torch.no_grad():
        for p in params.values():
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()


def grad_scaler(model: nn.Module, dtype: torch.dtype | None):
    """A dynamic loss scaler for fp16 (None otherwise: bf16 has fp32's exponent range)."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(_device(model).type)
