"""The fast path of a ConvLSTM layer: the same equations as
:meth:`nowcast.nn.ConvLSTMCell.recurrent_step`, computed with fewer allocations and
one autograd node per layer.

Taken by :meth:`ConvLSTMCell.run <nowcast.nn.ConvLSTMCell.run>` when :func:`applies`:
a default cell (tanh/sigmoid, no peepholes, odd kernels), ``backend.settings.fused``
on, and not tracing (``torch.compile`` / ``torch.export`` see the plain ops). Tests in
``tests/test_nn_convlstm.py`` check it against the plain path, float64 and gradcheck.

* :class:`_FusedConvLSTMLayer`: the recurrence of a layer as one autograd node with a
  hand-written backward through time (:func:`_lstm_forward` is its forward).
* :func:`_run_inference`: without autograd, input gates a few steps at a time.
* :func:`_run_chunk`: one chunk of steps (inference and gradient checkpointing).
* :func:`_timing_step`: the work ``memory_format="auto"`` times under
  :func:`nowcast.nn.backend.tune`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nowcast.nn import buffers
from nowcast.nn.backend import settings
from nowcast.nn.conv import conv2d, conv2d_add_, conv2d_backward, conv2d_input_grad

if TYPE_CHECKING:
    from nowcast.nn.convlstm import ConvLSTMCell

State = tuple[Tensor, Tensor]


def applies(cell: ConvLSTMCell) -> bool:
    """Whether ``cell`` runs on this fast path now."""
    from nowcast.nn.convlstm import _is_tracing  # convlstm imports this module

    return cell._fusable and settings.fused and not _is_tracing()


def run(cell: ConvLSTMCell, x_gates: Tensor, state: State, zero_state: bool, consume: bool
        ) -> tuple[Tensor, State]:
    """:meth:`ConvLSTMCell.run` on the fast path: ``x_gates`` ``(T, B, 4Ch, H, W)`` ->
    ``hs`` ``(T, B, Ch, H, W)`` and the final ``(h, c)``."""
    if torch.is_grad_enabled():
        hs, c = _FusedConvLSTMLayer.apply(
            x_gates, cell.weight_h, *state, cell._h_padding, zero_state, consume
        )
    else:  # inference: the same in-place loop, nothing saved
        dtype = x_gates.dtype
        hs, c, *_ = _lstm_forward(
            x_gates, cell.weight_h.to(dtype), cell._h_padding,
            state[0].to(dtype), state[1].to(dtype), save=False, zero_h0=zero_state,
            consume=consume,
        )
    return hs, (hs[-1], c)


def _frames_like(like: Tensor, steps: int, channels: int) -> Tensor:
    """Empty ``(T, B, channels, H, W)`` buffer whose frames ``[t]`` have the memory format
    (contiguous or channels_last) of ``like`` ``(B, *, H, W)``, so ``[t]`` and
    ``.flatten(0, 1)`` are views a convolution reads without a copy. Large CPU buffers
    come from :mod:`nowcast.nn.buffers` (kept between training steps)."""
    b, _, h, w = like.shape
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(
        memory_format=torch.channels_last
    ):
        buf = buffers.empty((steps, b, h, w, channels), like.dtype, like.device)  # (T, B, H, W, C)
        return buf.permute(0, 1, 4, 2, 3)  # (T, B, C, H, W) view
    return buffers.empty((steps, b, channels, h, w), like.dtype, like.device)


def _gate_scale(like: Tensor, n: int) -> Tensor:
    """``(1, 4*n, 1, 1)`` factors ``[1, 1, 2, 1]`` per gate block ``i, f, g, o``."""
    scale = like.new_ones(4, n)
    scale[2] = 2.0
    return scale.view(1, 4 * n, 1, 1)


def _tanh_(x: Tensor) -> Tensor:
    """In-place ``tanh(x) = 2 sigmoid(2x) - 1``: torch's CPU sigmoid is several times
    faster than its tanh, and the identity is exact up to rounding."""
    return x.mul_(2).sigmoid_().mul_(2).sub_(1)


def _lstm_forward(
    x_gates: Tensor, weight_h: Tensor, padding: tuple[int, int], h0: Tensor, c0: Tensor, save: bool,
    zero_h0: bool = False, consume: bool = False,
) -> tuple[Tensor, Tensor, list[Tensor], Tensor | None, Tensor | None]:
    """The recurrence of one tanh/sigmoid layer without peepholes, without autograd.

    ``x_gates`` ``(T, B, 4*Ch, H, W)`` are the input-to-state pre-activations (bias
    included). Returns ``hs`` ``(T, B, Ch, H, W)``, ``c_T``, and for the backward the
    gates ``sigmoid(a_i), sigmoid(a_f), sigmoid(2 a_g), sigmoid(a_o)`` of every step and
    every ``c_t`` and ``tanh(c_t)`` (the last three empty unless ``save``). ``zero_h0``
    says ``h0`` is zero (the default initial state): the first recurrent convolution,
    which would return zeros, is skipped. ``consume`` lets the gates of step ``t``
    overwrite ``x_gates[t]``: the recurrent convolution is added into it in place
    (:func:`~nowcast.nn.conv.conv2d_add_`), so a step allocates nothing.

    Why so: all four gates go through one sigmoid over the whole contiguous gate
    tensor (``tanh(a) = 2 sigmoid(2a) - 1``, the factor 2 folded into the recurrent
    weight and the one pass that adds the input gates), instead of four activations on
    strided channel slices, which cost ~3x more per element in channels_last. The math
    writes into preallocated buffers, so a step allocates only the convolution output
    (nothing with ``consume``).
    """
    steps = x_gates.shape[0]
    n = weight_h.shape[0] // 4
    scale = _gate_scale(weight_h, n)  # (1, 4Ch, 1, 1)
    weight_2g = weight_h * scale.view(-1, 1, 1, 1)  # g rows doubled
    hs = _frames_like(h0, steps, n)  # (T, B, Ch, H, W)
    cs = _frames_like(c0, steps, n) if save else None
    tanh_cs = _frames_like(c0, steps, n) if save else None
    saved_gates: list[Tensor] = []
    # without save: c_t in turns in two buffers, tanh(c_t) in a third (no allocation per step)
    c_bufs = [] if save else [torch.empty_like(c0) for _ in range(3)]
    h, c = h0, c0
    for t in range(steps):
        if consume:  # the gates overwrite x_gates[t]: no allocation per step
            gates = x_gates[t].mul_(scale)  # (B, 4*Ch, H, W)
            if t > 0 or not zero_h0:
                conv2d_add_(gates, h, weight_2g, padding)
        elif t == 0 and zero_h0:
            gates = torch.mul(x_gates[0], scale)
        else:
            gates = conv2d(h, weight_2g, None, padding).addcmul_(x_gates[t], scale)
        gates.sigmoid_()  # a_i, a_f, 2 a_g, a_o -> sigmoids
        i, f, s_g, o = gates.split(n, dim=1)  # each (B, Ch, H, W)
        c_next = cs[t] if save else c_bufs[t % 2]
        torch.mul(f, c, out=c_next)
        c_next.addcmul_(i, s_g, value=2).sub_(i)  # += i * g with g = 2 s_g - 1
        tanh_c = tanh_cs[t] if save else c_bufs[2]
        _tanh_(torch.mul(c_next, 1, out=tanh_c))
        torch.mul(o, tanh_c, out=hs[t])
        if save:
            saved_gates.append(gates)
        h, c = hs[t], c_next
    return hs, c, saved_gates, cs, tanh_cs


class _FusedConvLSTMLayer(torch.autograd.Function):
    """The whole recurrence of one layer (tanh/sigmoid, no peepholes) as one autograd node.

    Forward: ``(x_gates (T, B, 4Ch, H, W), weight_h, h0, c0) -> (hs (T, B, Ch, H, W), c_T)``;
    ``zero_h0`` and ``consume`` as in :func:`_lstm_forward` (with ``consume`` the caller
    hands over ``x_gates``, which nothing else may read afterwards).

    Why: step-by-step autograd records ~15 nodes per step, each allocating full-size
    gradients, and computes the recurrent weight gradient as T small convolutions. Here
    the backward runs hand-derived BPTT: per step only the pointwise derivatives (with
    ATen's one-pass ``sigmoid_backward``/``tanh_backward``) and the input-gradient
    convolution, writing ``dL/dx_gates`` straight into one buffer (which is also the
    gradient of the input-to-state convolution: no stack/unbind copies), then the weight
    gradient of all steps as one large convolution-backward over ``T*B`` frames.
    """

    @staticmethod
    def forward(ctx, x_gates: Tensor, weight_h: Tensor, h0: Tensor, c0: Tensor, padding: tuple[int, int],  # type: ignore[override]
                zero_h0: bool = False, consume: bool = False):
        ctx.set_materialize_grads(False)  # unused outputs get None, not zero tensors
        # Compute in the dtype of the gates: under autocast the input convolution ran in
        # bf16/fp16, and the recurrence follows (as autocast does for the step-wise path).
        dtype = x_gates.dtype
        ctx.padding = padding
        ctx.zero_h0 = zero_h0
        ctx.dtypes = (weight_h.dtype, h0.dtype, c0.dtype)  # of the gradients to return
        w, h0, c0 = weight_h.to(dtype), h0.to(dtype), c0.to(dtype)
        if consume:  # its memory becomes the saved gates; no autograd history on them
            x_gates = x_gates.detach()
        hs, c_last, gates, cs, tanh_cs = _lstm_forward(x_gates, w, padding, h0, c0, True, zero_h0, consume)
        ctx.save_for_backward(w, h0, c0, hs, cs, tanh_cs, *gates)
        # c_T is a view of the saved buffer; hand out a copy so in-place changes by the
        # caller cannot corrupt what the backward reads.
        return hs, c_last.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_hs: Tensor | None, grad_c: Tensor | None):  # type: ignore[override]
        w, h0, c0, hs, cs, tanh_cs, *gates = ctx.saved_tensors
        steps = hs.shape[0]
        n = w.shape[0] // 4
        sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input  # g * y * (1 - y)
        tanh_backward = torch.ops.aten.tanh_backward.grad_input  # g * (1 - y^2)
        grad_x = _frames_like(gates[0], steps, 4 * n)  # (T, B, 4Ch, H, W), dL/dx_gates
        dc = torch.zeros_like(c0) if grad_c is None else grad_c.to(c0.dtype).clone()
        dh_rec: Tensor | None = None  # dL/dh_t through the recurrent convolution of step t+1
        tmp = torch.empty_like(c0)
        for t in reversed(range(steps)):
            if grad_hs is None:
                dh = dh_rec if dh_rec is not None else torch.zeros_like(c0)
            elif dh_rec is None:
                dh = grad_hs[t]
            else:
                dh = dh_rec.add_(grad_hs[t])
            i, f, s_g, o = gates[t].split(n, dim=1)  # saved sigmoids, each (B, Ch, H, W)
            tanh_c = tanh_cs[t]
            c_prev = c0 if t == 0 else cs[t - 1]
            di, df, dg, do = grad_x[t].split(n, dim=1)
            # h = o tanh(c):  da_o = sigmoid'(dh tanh c);  dc += tanh'(dh o)
            sigmoid_backward(torch.mul(dh, tanh_c, out=tmp), o, grad_input=do)
            dc.add_(tanh_backward(torch.mul(dh, o, out=tmp), tanh_c, grad_input=tmp))
            # c = f c_prev + i g with g = 2 s_g - 1 = tanh(a_g)
            torch.mul(dc, s_g, out=tmp).mul_(2).sub_(dc)  # dc * g
            sigmoid_backward(tmp, i, grad_input=di)
            sigmoid_backward(torch.mul(dc, c_prev, out=tmp), f, grad_input=df)
            # da_g = dc i (1 - g^2) = 4 dc i s_g (1 - s_g)
            sigmoid_backward(torch.mul(dc, i, out=tmp).mul_(4), s_g, grad_input=dg)
            dc.mul_(f)  # dL/dc_{t-1}
            h_prev = h0 if t == 0 else hs[t - 1]
            if t > 0 or ctx.needs_input_grad[2]:
                dh_rec = conv2d_input_grad(grad_x[t], h_prev, w, ctx.padding)
        grad_w = None
        if ctx.needs_input_grad[1]:
            # All steps' weight gradients in one convolution-backward over T*B frames
            # (a larger GEMM than T small ones), plus step 0 whose input is h0 (none
            # when h0 is zero).
            grad_w = torch.zeros_like(w)
            if not ctx.zero_h0:
                grad_w += conv2d_backward(grad_x[0], h0, w, ctx.padding, [False, True, False])[1]
            if steps > 1:
                grad_w += conv2d_backward(
                    grad_x[1:].flatten(0, 1), hs[:-1].flatten(0, 1), w, ctx.padding, [False, True, False]
                )[1]
            grad_w = grad_w.to(ctx.dtypes[0])
        grad_h0 = dh_rec.to(ctx.dtypes[1]) if ctx.needs_input_grad[2] else None
        grad_c0 = dc.to(ctx.dtypes[2]) if ctx.needs_input_grad[3] else None
        return grad_x, grad_w, grad_h0, grad_c0, None, None, None



def _timing_step(
    cell: ConvLSTMCell, b: int, frame: tuple[int, int, int], fmt: torch.memory_format
) -> Callable[[], None]:
    """A two-step training pass of ``cell`` on random ``b`` x ``frame`` ``(C, H, W)``
    inputs in layout ``fmt`` (what ``memory_format="auto"`` times): the input
    convolution, the recurrence and all their gradients, the parameters' ``.grad`` left
    alone. (A one-step pass, half the cost, ranked the layouts of config S the other way
    round from its full training step.)"""
    # Also when the layer is first called under torch.inference_mode (evaluation), whose
    # tensors autograd cannot use.
    with torch.inference_mode(False):
        frames = torch.randn(2 * b, *frame, dtype=cell.weight_h.dtype).to(memory_format=fmt)
    inputs = [frames.requires_grad_(), *(p for p in cell.parameters() if p.requires_grad)]

    def step() -> None:
        with torch.inference_mode(False), torch.enable_grad():
            x_gates = cell.input_conv(frames).unflatten(0, (2, b))  # (2, B, 4Ch, H', W')
            hs, _ = cell.run(x_gates, cell.init_state(x_gates[0]), consume=True)
            torch.autograd.grad(hs, inputs, torch.ones_like(hs), allow_unused=True)

    return step


#: Time steps whose input-to-state convolutions run together in inference (no autograd).
_INFERENCE_CHUNK = 4


def _run_inference(
    cell: ConvLSTMCell, frames: Tensor, first: Tensor, state: State, zero_state: bool,
    fmt: torch.memory_format,
) -> tuple[Tensor, State]:
    """The recurrence without autograd, its input gates computed a few steps at a time.

    ``frames`` ``(T, B, C, H, W)``, ``first`` the input gates of the first chunk
    ``(k, B, 4Ch, H', W')`` -> ``hs`` ``(T, B, Ch, H', W')`` and the final ``(h, c)``.

    Why: the gates of all steps at once are ``4 Ch / C`` times the input (671 MB for B 8,
    T 20, 64x64, 64 hidden channels, from a 1-channel input). Nothing needs them after
    the step that reads them, and a buffer that large is handed back to the OS when
    freed, so every forward paid ~160k page faults for it (ConvLSTM2D S forward: 4.0 s,
    of which 1.1 s in the kernel, against 3.3 s in chunks of 4 steps). Chunks keep the
    batched convolution's efficiency and reuse the same memory.
    """
    steps, k = frames.shape[0], first.shape[0]
    hs_first, state = cell.run(first, state, zero_state, consume=True)
    if k >= steps:
        return hs_first, state
    hs = _frames_like(hs_first[0], steps, cell.hidden_channels)  # (T, B, Ch, H', W')
    hs[:k].copy_(hs_first)
    c = state[1]
    for start in range(k, steps, k):
        out, c = _run_chunk(cell, frames[start : start + k], hs[start - 1], c, False, fmt)
        hs[start : start + out.shape[0]].copy_(out)
    return hs, (hs[-1], c)


def _run_chunk(
    cell: ConvLSTMCell, frames: Tensor, h: Tensor, c: Tensor, zero_state: bool, fmt: torch.memory_format
) -> tuple[Tensor, Tensor]:
    """One chunk: ``frames`` ``(k, B, C, H, W)`` -> ``(hs, c_k)``, the layer in layout ``fmt``."""
    # .to as in ConvLSTM2D.forward: flatten gives one-channel frames NCHW strides again
    x = frames.flatten(0, 1).to(memory_format=fmt)
    x_gates = cell.input_conv(x).unflatten(0, frames.shape[:2])  # (k, B, 4Ch, H', W')
    hs, (_, c) = cell.run(x_gates, (h, c), zero_state, consume=True)
    return hs, c
