"""The one seam between the readable ConvLSTM and its fast paths.

:class:`~nowcast.nn.ConvLSTM2D` computes the equations of :mod:`nowcast.nn.convlstm`
with plain tensor ops: the reference path, what ``torch.compile`` and ``torch.export``
trace. Where it is safe, it hands the work to one of these fast paths instead, each
switched by a field of the settings object :data:`settings` (like
``torch.backends.cudnn``), never by a stopwatch or an environment variable:

``fused`` (default on)
    The recurrence of a default layer (tanh/sigmoid, no peepholes, odd kernels) as one
    autograd node with hand-written backpropagation through time, and a no-grad loop
    that writes into preallocated buffers in inference (:mod:`nowcast.nn.fused`).
``cpu_conv`` (default ``"auto"``)
    Which CPU kernel runs a stride-1 float32 convolution of an NCHW layer: ``"native"``
    (``F.conv2d``, oneDNN), ``"nnpack"`` (NNPACK's Winograd/FFT kernels wherever they
    apply) or ``"auto"``: NNPACK for kernels of 5x5 and larger over at least 16 input
    channels, oneDNN otherwise (:func:`nowcast.nn.conv._nnpack_rule`; measured in
    ``docs/benchmarks.md``), unless :func:`tune` (or ``benchmark=True``) timed the shape.
``memory_format`` rule (``ConvLSTM2D(memory_format="auto")``)
    channels_last, except CPU float32 layers whose recurrent kernel is 5x5 or larger
    while NNPACK may run them, which stay NCHW, unless :func:`tune` timed them.
``inplace_add`` (default on)
    oneDNN's fused ``out += conv(x, w)`` for channels_last CPU tensors: each step's
    recurrent convolution is added into its input gates without a new tensor.
``buffer_pool`` (default on)
    Large CPU buffers kept between training steps (:mod:`nowcast.nn.buffers`).
``benchmark`` (default off)
    Time the candidates the first time a shape is met and keep the winner, like
    ``torch.backends.cudnn.benchmark``. Off by default so that which code runs never
    depends on a stopwatch; :func:`tune` does the same timing when you call it.

Every fast path that calls a private torch API asks :func:`capabilities` first and falls
back to public ops where the API is missing, so a torch release that drops one only
loses speed. ``with reference():`` switches every fast path off (CI runs the ``nn``
tests a second time so, ``pytest --nn-reference``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from typing import Literal

import torch

__all__ = ["Capabilities", "Settings", "capabilities", "override", "reference", "settings", "tune"]

CpuConv = Literal["auto", "native", "nnpack"]
_CPU_CONV = ("auto", "native", "nnpack")


@dataclasses.dataclass
class Settings:
    """The fast-path switches (see the module docstring)."""

    fused: bool = True
    cpu_conv: CpuConv = "auto"
    inplace_add: bool = True
    buffer_pool: bool = True
    benchmark: bool = False

    def __setattr__(self, name: str, value) -> None:
        if name not in {f.name for f in dataclasses.fields(Settings)}:
            raise AttributeError(
                f"nowcast.nn.backend.settings has no setting {name!r}; "
                f"valid: {[f.name for f in dataclasses.fields(Settings)]}"
            )
        if name == "cpu_conv" and value not in _CPU_CONV:
            raise ValueError(f"cpu_conv must be one of {_CPU_CONV}, got {value!r}")
        if name != "cpu_conv" and not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        super().__setattr__(name, value)


#: The process-wide settings; change a field, or use :func:`override` for a block.
settings = Settings()


@contextlib.contextmanager
def override(**changes) -> Iterator[Settings]:
    """Change settings inside a ``with`` block: ``with override(fused=False): ...``."""
    old = dataclasses.asdict(settings)
    try:
        for name, value in changes.items():
            setattr(settings, name, value)
        yield settings
    finally:
        for name, value in old.items():
            setattr(settings, name, value)


def reference() -> contextlib.AbstractContextManager[Settings]:
    """Every fast path off: plain tensor ops and ``F.conv2d`` only."""
    return override(fused=False, cpu_conv="native", inplace_add=False, buffer_pool=False,
                    benchmark=False)


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """Which private torch entry points the fast paths may call in this torch build."""

    nnpack: bool  #: ``torch._nnpack_spatial_convolution`` and NNPACK initialised
    onednn_add: bool  #: ``torch.ops.mkldnn._convolution_pointwise_.binary`` (in-place sum)
    #: the same in bfloat16 (oneDNN needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT for it)
    onednn_add_bf16: bool
    storage_use_count: bool  #: ``torch._C._storage_Use_Count`` (the buffer pool's test)


@functools.cache
def capabilities() -> Capabilities:
    """Probe the private APIs once (each with a tiny call, not only ``hasattr``)."""
    return Capabilities(
        nnpack=_probe_nnpack(),
        onednn_add=_probe_onednn_add(torch.float32),
        onednn_add_bf16=_probe_onednn_add(torch.bfloat16),
        storage_use_count=_probe_use_count(),
    )


def _probe_nnpack() -> bool:
    try:
        if not (hasattr(torch, "_nnpack_spatial_convolution") and torch._nnpack_available()):
            return False
        x, w = torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3)
        y = torch._nnpack_spatial_convolution(x, w, None, (1, 1))
        return bool(y.shape == (1, 1, 3, 3) and abs(float(y[0, 0, 1, 1]) - 9.0) < 1e-3)
    except Exception:  # noqa: BLE001 - any failure means: do not use it
        return False


def _probe_onednn_add(dtype: torch.dtype) -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._convolution_pointwise_.binary
        cl = torch.channels_last
        out, x = (torch.ones(1, 2, 3, 3, dtype=dtype).contiguous(memory_format=cl) for _ in range(2))
        w = torch.ones(2, 2, 3, 3, dtype=dtype).contiguous(memory_format=cl)
        op(out, x, w, None, [1, 1], [1, 1], [1, 1], 1, "add", None, None, [], "")
        return abs(float(out[0, 0, 1, 1]) - 19.0) < 1e-3  # 1 + 2 channels x 9 taps
    except Exception:  # noqa: BLE001
        return False


def _probe_use_count() -> bool:
    fn = getattr(torch._C, "_storage_Use_Count", None)
    if fn is None:
        return False
    try:
        t = torch.empty(4)
        return int(fn(t.untyped_storage()._cdata)) >= 1
    except Exception:  # noqa: BLE001
        return False


def tune(module: torch.nn.Module, *example_inputs, backward: bool = True) -> dict[str, int]:
    """Time the kernel and layout candidates for the shapes ``module`` meets on
    ``example_inputs`` (one forward, and a backward of the summed output when
    ``backward``), and keep the winners for the rest of the process, as
    ``torch.backends.cudnn.benchmark`` would on the first call. The parameters' ``.grad``
    are left as they were. Call it once before training or inference at a new frame
    size; what it chose stays until :func:`nowcast.nn.conv.clear_tuning`.

    Returns how many kernel and layout choices are now cached (``kernels``, ``layouts``).
    """
    from nowcast.nn import conv  # conv imports this module

    grads = {p: p.grad for p in module.parameters()}
    with override(benchmark=True), torch.enable_grad():
        out = module(*example_inputs)
        if backward:
            tensors = [t for t in _flatten(out) if t.requires_grad]
            if tensors:
                torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
    for p, g in grads.items():
        p.grad = g
    return {"kernels": len(conv._choices), "layouts": len(conv._layouts)}


def _flatten(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    return []
