"""Training precision chosen by the hardware: bf16 autocast only where the device runs it natively.

``TrainConfig.bf16`` is ``"auto"`` (the default), ``True`` or ``False``. ``"auto"`` turns bf16 autocast on
where bf16 matmuls run in hardware (CUDA devices with bf16 support; x86 CPUs with AVX-512-BF16 or AMX-BF16;
ARM CPUs whose oneDNN reports bf16) and leaves fp32 everywhere else. On an AVX2-only CPU oneDNN emulates
bf16: one tokenizer step of the small preset took 3.05 s under bf16 autocast against 0.39 s in fp32
(2026-11, AMD EPYC, AVX2), so "auto" must not pick it there. Forcing ``True`` on such a CPU still works and
warns how much slower it is expected to be.
"""

from __future__ import annotations

import functools
import platform
import warnings
from typing import Literal

import torch

from worldflow.errors import InputError

Bf16Setting = bool | Literal["auto"]

# Measured slowdown of bf16 autocast where it is emulated (tokenizer step, small preset, AVX2 CPU).
EMULATED_SLOWDOWN = 7.9


@functools.cache
def _cpu_bf16_native() -> bool:
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        cpu = torch.cpu
        avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        return bool(avx512_bf16 or amx)
    try:  # aarch64 and others: oneDNN knows whether the ISA has bf16 instructions
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_native(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 matmuls in hardware (rather than emulating them)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if dev.type == "cpu":
        return _cpu_bf16_native()
    return False


def describe_cpu() -> str:
    """'AVX512, bf16 native' / 'AVX2, bf16 emulated': the CPU facts a benchmark figure must name."""
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{cap}, bf16 {'native' if _cpu_bf16_native() else 'emulated'}"


def use_bf16(setting: Bf16Setting, device: torch.device | str, section: str = "train") -> bool:
    """Resolve a ``bf16`` setting for ``device``: "auto" -> native support; True/False force it.

    Forcing True where bf16 is emulated warns (``section`` names the config key to change).
    """
    if setting == "auto":
        return bf16_native(device)
    if setting not in (True, False):
        raise InputError(f"{section}.bf16 must be auto, true or false, got {setting!r}")
    if setting and not bf16_native(device):
        where = torch.device(device).type
        detail = describe_cpu() if where == "cpu" else where
        warnings.warn(f"{section}.bf16=true on a device without native bf16 ({detail}): autocast is "
                      f"emulated, expect steps ~{EMULATED_SLOWDOWN:.0f}x slower than fp32; "
                      f"set {section}.bf16=auto", stacklevel=2)
    return bool(setting)


def name(bf16: bool) -> str:
    """The precision's name in logs and summaries: "bf16" or "fp32"."""
    return "bf16" if bf16 else "fp32"
