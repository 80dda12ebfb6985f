"""The fastest CPU kernel for each stride-1 convolution shape: oneDNN or NNPACK.

``F.conv2d`` on the CPU runs oneDNN's direct convolution. PyTorch also ships NNPACK,
whose Winograd and FFT kernels do fewer multiplications: on the 2-core AVX-512 machines
this project is developed on, NNPACK runs the 5x5 ConvLSTM convolutions 1.3-2.3x faster
and some 3x3 ones 1.3x faster, while oneDNN wins others (few input channels, 3x3 with
more input than output channels). Which one wins depends on the shape and the machine,
so :func:`conv2d` times both the first time it meets a shape (like
``torch.backends.cudnn.benchmark``) and remembers the winner. With
``torch.use_deterministic_algorithms(True)`` (Lightning's ``deterministic=True``) it
keeps to oneDNN, so that runs repeat bit for bit.

NNPACK is used only where it computes the same function: float32 CPU tensors outside
autocast, stride 1, dilation 1, symmetric padding, not while tracing or compiling; and
only on NCHW-contiguous inputs, i.e. in ConvLSTM layers that run in NCHW (in
channels_last layers the layout copies cost more than NNPACK saves). Whether a layer
runs in NCHW (where NNPACK may win) or channels_last (oneDNN's faster layout) is itself
timed per shape by :func:`fastest_memory_format` (``ConvLSTM2D(memory_format="auto")``,
the default). Measured on the benchmark configs (``docs/benchmarks.md``): NCHW with
NNPACK for the 5x5 layers of config P (training 1.26x the reference, forward 1.78x),
channels_last for the 3x3 layers of config S. Its Winograd/FFT results differ from
oneDNN's by float32 rounding (relative ~1e-6); float64 never uses it.

Where oneDNN runs in channels_last, large outputs are not allocated fresh: the
batched input convolution writes into a zeroed block kept by :mod:`nowcast.nn.buffers`
and :func:`conv2d_add_` adds a step's recurrent convolution into its input gates in
place (oneDNN's fused sum), because blocks over 32 MiB come from ``mmap`` and the page
faults and zeroing cost ~30% of a training step at config S (``docs/benchmarks.md``).

``NOWCAST_CPU_CONV`` (environment) or :func:`set_cpu_conv_backend` choose the policy:
``"auto"`` (default: benchmark per shape), ``"native"`` (always ``F.conv2d``) or
``"nnpack"`` (NNPACK wherever eligible).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils import flop_counter
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from nowcast.nn import buffers
from nowcast.nn.backend import capabilities, settings
from nowcast.nn.cpu import cpu_capabilities

__all__ = [
    "conv2d",
    "conv2d_add_",
    "conv2d_backward",
    "conv2d_input_grad",
    "fastest_memory_format",
    "clear_tuning",
    "get_cpu_conv_backend",
    "set_cpu_conv_backend",
]

_choices: dict[tuple, bool] = {}  # shape key -> use NNPACK, from tune() / benchmark
_layouts: dict[tuple, torch.memory_format] = {}  # shape key -> memory format, likewise

#: ``"auto"`` picks NNPACK for kernels at least this large (where its Winograd/FFT kernels
#: beat oneDNN's direct convolution): 5x5 on CPUs with AVX-512, 3x3 on AVX2-only CPUs,
#: where oneDNN has half the vector width (measured: docs/benchmarks.md) ...
NNPACK_MIN_KERNEL = {"avx512": 5, "avx2": 3}
#: ... and at least this many input channels (oneDNN wins on few-channel inputs).
NNPACK_MIN_CHANNELS = 16


def set_cpu_conv_backend(policy: str) -> None:
    """Set ``nowcast.nn.backend.settings.cpu_conv``: ``"auto"``, ``"native"`` (always
    ``F.conv2d``, i.e. oneDNN) or ``"nnpack"``; forgets tuned choices."""
    settings.cpu_conv = policy
    clear_tuning()


def get_cpu_conv_backend() -> str:
    """``nowcast.nn.backend.settings.cpu_conv``."""
    return settings.cpu_conv


def clear_tuning() -> None:
    """Forget the kernel and layout choices made by :func:`nowcast.nn.backend.tune`."""
    _choices.clear()
    _layouts.clear()


def _nnpack_rule(weight: Tensor) -> bool:
    """The documented ``"auto"`` choice for an NNPACK-eligible convolution (untuned)."""
    min_kernel = NNPACK_MIN_KERNEL["avx512" if cpu_capabilities().avx512 else "avx2"]
    return min(weight.shape[-2:]) >= min_kernel and weight.shape[1] >= NNPACK_MIN_CHANNELS


def _nnpack_available() -> bool:
    # The probe also initialises NNPACK; its kernels fail until that has run once.
    return capabilities().nnpack


def _eligible(x: Tensor, weight: Tensor, padding: tuple[int, int]) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        # NNPACK reads NCHW only: in channels_last layers the copies in and out (and the
        # mixed layouts after) cost more than it saves (measured: docs/benchmarks.md)
        and _nchw(x)
        and _nnpack_usable(weight, padding)
    )


def _nnpack_usable(weight: Tensor, padding: tuple[int, int]) -> bool:
    """Whether NNPACK may run a convolution with ``weight`` here, whatever its input's layout."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        # an even kernel's recurrent padding is the string "same" (asymmetric): not NNPACK's
        and not isinstance(padding, str)
        and padding[0] >= 0
        and padding[1] >= 0
        and settings.cpu_conv != "native"
        and not torch.is_autocast_enabled("cpu")  # F.conv2d would run in bf16/fp16 there
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and _nnpack_available()
    )


def _nchw(x: Tensor) -> bool:
    """NCHW-contiguous, and not a one-channel tensor given channels_last strides (which is
    contiguous in both layouts, but from which oneDNN writes channels_last outputs, as a
    channels_last layer wants, while NNPACK would write NCHW)."""
    one_channel_cl = x.shape[1] == 1 and x.stride(1) == 1 and x.shape[-2] * x.shape[-1] > 1
    return x.is_contiguous() and not one_channel_cl


def _fastest(candidates: dict, repeats: int = 3):
    """The key of the fastest of ``candidates`` (key -> no-argument function): each run
    once to warm up (weight reorders, scratch buffers, nested kernel choices), then
    ``repeats`` interleaved rounds, best time of each; interleaving makes a slow moment
    of a shared machine hit every candidate alike."""
    with torch.no_grad():
        for fn in candidates.values():
            fn()
        seconds = dict.fromkeys(candidates, float("inf"))
        for _ in range(repeats):
            for key, fn in candidates.items():
                start = time.perf_counter()
                fn()
                seconds[key] = min(seconds[key], time.perf_counter() - start)
    return min(seconds, key=seconds.__getitem__)


def _use_nnpack(x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> bool:
    if not _eligible(x, weight, padding):
        return False
    if settings.cpu_conv == "nnpack":
        return True
    if torch.are_deterministic_algorithms_enabled():
        return False  # a timing-dependent choice would make runs differ in the last bits
    key = (tuple(x.shape), tuple(weight.shape), padding, bias is not None,
           x.is_contiguous(), torch.get_num_threads())
    choice = _choices.get(key)
    if choice is None and settings.benchmark:
        xd, wd = x.detach(), weight.detach()
        b = None if bias is None else bias.detach()
        choice = _choices[key] = _fastest({
            False: lambda: F.conv2d(xd, wd, b, 1, padding),
            # including the copies conv2d makes for NNPACK (NCHW-contiguous only)
            True: lambda: torch._nnpack_spatial_convolution(xd.contiguous(), wd.contiguous(), b, padding),
        })
    return _nnpack_rule(weight) if choice is None else choice


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=padding)`` on the faster kernel.

    Differentiable (NNPACK's backward is torch's convolution backward). The NNPACK
    output is NCHW-contiguous whatever the input's memory format. Large channels_last
    outputs are written into a block of :mod:`nowcast.nn.buffers` (see
    :class:`_ConvIntoBuffer`).
    """
    if _use_nnpack(x, weight, bias, padding):
        return torch._nnpack_spatial_convolution(x.contiguous(), weight.contiguous(), bias, padding)
    if _into_buffer(x, weight, bias, padding):
        return _ConvIntoBuffer.apply(x, weight, bias, padding)
    return F.conv2d(x, weight, bias, 1, padding)


def _onednn_inplace(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether oneDNN may add a stride-1 convolution of ``x`` into a channels_last buffer
    in place: channels_last float32/bfloat16 CPU tensors of one dtype, outside autocast
    (which would change the dtypes) and tracing."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.dtype == weight.dtype
        and (bias is None or bias.dtype == x.dtype)
        and x.is_contiguous(memory_format=torch.channels_last)
        and not _nchw(x)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and settings.inplace_add
        and (capabilities().onednn_add_bf16 if x.dtype == torch.bfloat16 else capabilities().onednn_add)
    )


def _add_conv_(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> Tensor:
    """``out += conv2d(x, weight, bias)``, oneDNN's fused sum post-op (no output allocated)."""
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        out, x, weight, bias, list(padding), [1, 1], [1, 1], 1, "add", None, None, [], ""
    )


def _add_conv_flops(other_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """So that ``torch.utils.flop_counter.FlopCounterMode`` counts :func:`_add_conv_` as
    the convolution it is (the fused add is not counted, as torch leaves out biases)."""
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


if hasattr(torch.ops.mkldnn, "_convolution_pointwise_"):
    _packet = torch.ops.mkldnn._convolution_pointwise_
    register_flop_formula(_packet)(_add_conv_flops)
    # torch 2.4 files the formula under each overload only, while FlopCounterMode looks
    # the packet up: file it there too (a no-op where torch already did)
    _registry = getattr(flop_counter, "flop_registry", None)
    _wrap = getattr(flop_counter, "shape_wrapper", None)
    if _registry is not None and _wrap is not None and _packet not in _registry:
        _registry[_packet] = _wrap(_add_conv_flops)


def _out_shape(x: Tensor, weight: Tensor, padding: tuple[int, int]) -> tuple[int, int, int, int]:
    n, _, h, w = x.shape
    return (n, weight.shape[0], h + 2 * padding[0] - weight.shape[2] + 1, w + 2 * padding[1] - weight.shape[3] + 1)


def _into_buffer(x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> bool:
    """A large channels_last output that :class:`_ConvIntoBuffer` can write into a pool block."""
    if not (settings.buffer_pool and _onednn_inplace(x, weight, bias)) or min(padding) < 0:
        return False
    shape = _out_shape(x, weight, padding)
    return min(shape) > 0 and math.prod(shape) * x.dtype.itemsize >= buffers.MIN_BYTES


class _ConvIntoBuffer(torch.autograd.Function):
    """``conv2d(x, weight, bias, padding)`` written into a zeroed block of
    :mod:`nowcast.nn.buffers` by oneDNN's in-place sum, instead of a fresh output.

    Why: the input-to-state convolution of all steps of a layer writes 671 MB at config S;
    a fresh buffer that large is mapped from the OS, so every training step paid ~160k
    page faults and the kernel's zeroing for it, much more than zeroing a kept block.
    Backward: torch's convolution backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int]):  # type: ignore[override]
        n, c, h, w = _out_shape(x, weight, padding)
        out = buffers.empty((n, h, w, c), x.dtype).permute(0, 3, 1, 2).zero_()  # channels_last
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return _add_conv_(out, x, weight, bias, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        return *conv2d_backward(grad, x, weight, ctx.padding, mask, ctx.has_bias), None


def conv2d_add_(out: Tensor, x: Tensor, weight: Tensor, padding: tuple[int, int]) -> Tensor:
    """``out += conv2d(x, weight, padding=padding)`` in place; returns ``out``. No autograd.

    For channels_last float32/bfloat16 CPU tensors oneDNN adds the convolution into
    ``out`` as it writes it (a fused post-op), so no output is allocated. Why: a
    ConvLSTM step's gates are ~33 MB at config S, and a fresh buffer that large comes
    from ``mmap``, so every step paid for page faults and the kernel zeroing the pages
    (64->256 3x3 at B 8, 64x64: 46 ms in place against 53 ms for the convolution alone
    into a fresh tensor). Elsewhere: :func:`conv2d` and ``add_``.
    """
    if (
        out.dtype == x.dtype
        and not out.is_contiguous()
        and out.is_contiguous(memory_format=torch.channels_last)
        and _onednn_inplace(x, weight)
    ):
        return _add_conv_(out, x, weight, None, padding)
    return out.add_(conv2d(x, weight, None, padding))


def conv2d_backward(
    grad: Tensor, x: Tensor, weight: Tensor, padding: tuple[int, int], mask: list[bool], bias: bool = False
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dL/dx, dL/dweight, dL/dbias)`` of a stride-1, dilation-1 convolution
    given ``grad = dL/dout``, those not in ``mask`` ``None``: torch's convolution backward
    (oneDNN on the CPU). No autograd."""
    return torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if bias else None, [1, 1], list(padding), [1, 1],
        False, [0, 0], 1, mask,
    )


def conv2d_input_grad(grad: Tensor, x: Tensor, weight: Tensor, padding: tuple[int, int]) -> Tensor:
    """``dL/dx`` of ``conv2d(x, weight, padding=padding)`` given ``grad = dL/dout``.

    For stride 1 this is itself a convolution, of ``grad`` with the flipped, transposed
    kernel and padding ``k - 1 - p``, which :func:`conv2d` may run on NNPACK. No autograd.
    """
    kh, kw = weight.shape[-2:]
    flipped_padding = (kh - 1 - padding[0], kw - 1 - padding[1])
    # Check eligibility before flipping: flip() copies the kernel, and in the default
    # channels_last layers this runs every backward step only to fall back to oneDNN.
    if grad.shape[-2:] == x.shape[-2:] and _eligible(grad, weight, flipped_padding):
        flipped = weight.transpose(0, 1).flip(2, 3)  # (C_in, C_out, kh, kw)
        if _use_nnpack(grad, flipped, None, flipped_padding):
            return torch._nnpack_spatial_convolution(grad.contiguous(), flipped.contiguous(), None,
                                                     flipped_padding)
    return conv2d_backward(grad, x, weight, padding, [True, False, False])[0]


def fastest_memory_format(
    shape: tuple[int, int, int, int],
    weight: Tensor,
    padding: tuple[int, int],
    step: Callable[[torch.memory_format], Callable[[], None]] | None = None,
    key: tuple = (),
) -> torch.memory_format:
    """``torch.channels_last`` or ``torch.contiguous_format``: the layout in which a
    stride-1 convolution of an ``(N, C, H, W)`` input of ``shape`` with ``weight`` (and
    the work around it) runs faster here, timed once per shape like :func:`conv2d`'s
    kernel choice (at the first batch size ``N`` met, kept for all).

    ``step(fmt)`` returns a function that runs the work once in layout ``fmt`` (a
    :class:`~nowcast.nn.ConvLSTM2D` layer passes a two-step training pass of the layer);
    by default the convolution's forward, input gradient and weight gradient. ``key``
    tells apart different work around the same convolution.

    In channels_last every kernel is oneDNN's; in NCHW :func:`conv2d` and
    :func:`conv2d_input_grad` may run NNPACK's Winograd/FFT kernels, while weight
    gradients stay oneDNN's, slower in NCHW. Measured on the benchmark configs
    (``docs/benchmarks.md``): channels_last for 3x3 kernels over 64 channels, NCHW for
    5x5 ones. Where NNPACK cannot run (not CPU float32, autocast, tracing, the
    ``"native"`` policy, deterministic algorithms), channels_last without timing.
    """
    if not _nnpack_usable(weight, padding) or torch.are_deterministic_algorithms_enabled():
        return torch.channels_last
    # Not the batch size: the first one met decides for all (a short last batch or a
    # validation batch size would otherwise be timed again).
    full_key = (tuple(shape[1:]), tuple(weight.shape), padding, torch.get_num_threads(), key)
    choice = _layouts.get(full_key)
    if choice is None and settings.benchmark:
        build = step or (lambda fmt: _conv_step(shape, weight, padding, fmt))
        formats = (torch.channels_last, torch.contiguous_format)
        # the warm-up also makes conv2d's own kernel choices for these shapes
        choice = _layouts[full_key] = _fastest({fmt: build(fmt) for fmt in formats})
    if choice is None:  # the rule: NCHW where the recurrent convolution would take NNPACK
        choice = torch.contiguous_format if _nnpack_rule(weight) else torch.channels_last
    return choice


def _conv_step(
    shape: tuple[int, int, int, int], weight: Tensor, padding: tuple[int, int], fmt: torch.memory_format
) -> Callable[[], None]:
    """Forward, input gradient and weight gradient of one convolution, in layout ``fmt``."""
    x = torch.randn(shape, dtype=weight.dtype).contiguous(memory_format=fmt)
    w = weight.detach().contiguous(memory_format=fmt)
    grad = torch.randn_like(F.conv2d(x, w, None, 1, padding))

    def step() -> None:
        conv2d(x, w, None, padding)
        conv2d_input_grad(grad, x, w, padding)
        conv2d_backward(grad, x, w, padding, [False, True, False])

    return step
