"""bf16 autocast where the hardware multiplies bf16 natively, float32 everywhere else (issue 20).

The weights, gradients and optimizer state stay float32 (the model's `model.dtype`); only the matmuls of a forward
pass run in bfloat16 under `torch.autocast`, and callers cast logits to float32 before log-softmax, so log-probs and
losses are float32. On a CPU without bf16 instructions a bf16 matmul is emulated (over 100x slower than float32
with AVX2 only), so `auto` turns autocast on for a CPU only when /proc/cpuinfo lists `avx512_bf16` or `amx_bf16`.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

AUTOCAST_MODES = ("off", "bf16", "auto")
ROLLOUT_DTYPES = ("model", "float32", "bfloat16", "float16", "auto")  # `rollout.dtype`
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that multiply bf16 in hardware
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of /proc/cpuinfo text: the union of every `flags` line (x86, one per logical CPU)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            flags.update(value.split())
    return flags


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU (or the one `cpuinfo`, /proc/cpuinfo text, describes) multiplies bf16 in hardware:
    `avx512_bf16` or `amx_bf16` among its flags. Without /proc/cpuinfo (not Linux) torch's own CPUID check
    answers (private, so read defensively). ARM's bf16 extension counts as not native: not measured here."""
    if cpuinfo is None:
        if CPUINFO.is_file():
            cpuinfo = CPUINFO.read_text()
        else:
            names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
            return any(bool(check()) for check in (getattr(torch.cpu, n, None) for n in names) if check is not None)
    return any(flag in cpu_flags(cpuinfo) for flag in NATIVE_BF16_FLAGS)


@functools.lru_cache(maxsize=None)
def _this_cpu_has_native_bf16() -> bool:
    return cpu_has_native_bf16()


def device_type(device: str) -> str:
    """"cuda" of "cuda:1", "cpu" of "cpu": what `torch.autocast` takes."""
    return torch.device(device).type


def use_bf16_autocast(mode: str, device: str, cpuinfo: str | None = None) -> bool:
    """Whether forward passes on `device` run under bf16 autocast for the config's `mode`: off: never; bf16:
    always (also where it is emulated and slow: asked for); auto: CUDA that supports bf16, or a CPU with native
    bf16 (`cpu_has_native_bf16` of `cpuinfo`, default this machine's)."""
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"autocast must be one of {AUTOCAST_MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "bf16"
    if device_type(device) == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16(cpuinfo) if cpuinfo is not None else _this_cpu_has_native_bf16()


def rollout_dtype(mode: str, model_dtype: str, device: str, cpuinfo: str | None = None) -> str:
    """The dtype the hf engine holds its weights in for `rollout.dtype` `mode`: model: `model_dtype`; auto: bfloat16
    where bf16 is native (`use_bf16_autocast`'s auto rule), else `model_dtype`; else `mode` itself."""
    if mode not in ROLLOUT_DTYPES:
        raise ValueError(f"rollout.dtype must be one of {ROLLOUT_DTYPES}, got {mode!r}")
    if mode == "model":
        return model_dtype
    if mode == "auto":
        return "bfloat16" if use_bf16_autocast("auto", device, cpuinfo) else model_dtype
    return mode


def choose(mode: str, device: str, actor: str | None) -> bool:
    """`use_bf16_autocast` for an actor's forward passes, and unless `mode` is off one line saying what it chose and
    why (`describe`), printed as `actor`'s (None: not printed, e.g. a trainer rank other than 0)."""
    enabled = use_bf16_autocast(mode, device)
    if mode != "off" and actor:
        print(f"raylhf {actor}: {describe(mode, enabled, device)}", flush=True)
    return enabled


def autocast(enabled: bool, device: str) -> contextlib.AbstractContextManager:
    """A context running the matmuls of forward passes on `device` in bfloat16 (`enabled`), else nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=torch.bfloat16)


def describe(mode: str, enabled: bool, device: str) -> str:
    """One line saying what `mode` chose on `device`, and why (logged once by each actor that uses it)."""
    if mode != "auto":
        why = "as configured"
    elif device_type(device) == "cuda":
        why = "CUDA " + ("supports" if enabled else "lacks") + " bf16"
    else:
        why = (f"the CPU has {' or '.join(NATIVE_BF16_FLAGS)}" if enabled
               else f"the CPU has neither {' nor '.join(NATIVE_BF16_FLAGS)}: bf16 would be emulated")
    return f"autocast {mode}: {'bf16' if enabled else 'float32'} forward passes on {device_type(device)} ({why})"
