"""What this CPU can do natively, where a choice depends on it.

Machines differ: an AVX-512 CPU with the BF16 extension (``avx512_bf16``, or AMX) runs
bfloat16 convolutions natively, about twice as fast as float32; an AVX2-only CPU has no
bf16 arithmetic, so torch emulates it through float32 conversions, several times slower
than float32 itself. :func:`cpu_capabilities` reads the flags once;
:func:`bf16_is_native` and :func:`emulated_bf16_warning` are what training and the
benchmarks ask.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["CpuCapabilities", "bf16_is_native", "cpu_capabilities", "emulated_bf16_warning"]


@dataclass(frozen=True)
class CpuCapabilities:
    """The CPU's model name, its feature flags (``/proc/cpuinfo``) and torch's view."""

    model: str
    flags: frozenset[str]
    #: The SIMD level torch dispatches to (``torch.backends.cpu.get_cpu_capability()``).
    torch_capability: str

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags or "amx_tile" in self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware: AVX512-BF16 or AMX on x86, BF16 on Arm."""
        if platform.machine().lower() in ("aarch64", "arm64"):
            return "bf16" in self.flags
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    def summary(self) -> str:
        """One line for logs and benchmark tables."""
        named = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in self.flags]
        return (f"{self.model} ({', '.join(named) or 'no AVX2'}; torch {torch.__version__} "
                f"dispatch {self.torch_capability}, bf16 {'native' if self.native_bf16 else 'emulated'})")


@functools.cache
def cpu_capabilities() -> CpuCapabilities:
    """Read ``/proc/cpuinfo`` once (Linux; elsewhere the flags are empty)."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model") and model in ("", platform.machine()):
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = frozenset(value.split())
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return CpuCapabilities(model=model, flags=flags, torch_capability=get() if get else "unknown")


def bf16_is_native() -> bool:
    """Whether bfloat16 autocast on this CPU runs in hardware rather than emulated."""
    return cpu_capabilities().native_bf16


def emulated_bf16_warning(precision: str | int | None) -> str | None:
    """The warning for a CPU run asked for bf16 that this CPU would emulate, else ``None``."""
    if precision is None or "bf16" not in str(precision) or bf16_is_native():
        return None
    return (
        f"precision={precision} on a CPU without native bfloat16 ({cpu_capabilities().summary()}): "
        "torch emulates bf16 here, which is several times SLOWER than float32. "
        "Use trainer.precision=32-true on this machine (bf16 pays off on CPUs with "
        "AVX512-BF16 or AMX, and on GPUs)."
    )
