"""Convolutional LSTM layers (Shi et al. 2015), pure PyTorch.

Layout everywhere inside: ``(B, T, C, H, W)`` (batch, time, channels, height, width).
``data_format="channels_last"`` accepts and returns ``(B, T, H, W, C)`` instead.

The gate equations, with ``*`` a convolution and ``∘`` the Hadamard product::

    i_t = σ(W_xi * x_t + W_hi * h_{t-1} + W_ci ∘ c_{t-1} + b_i)
    f_t = σ(W_xf * x_t + W_hf * h_{t-1} + W_cf ∘ c_{t-1} + b_f)
    c_t = f_t ∘ c_{t-1} + i_t ∘ tanh(W_xc * x_t + W_hc * h_{t-1} + b_c)
    o_t = σ(W_xo * x_t + W_ho * h_{t-1} + W_co ∘ c_t + b_o)
    h_t = o_t ∘ tanh(c_t)

The peephole terms ``W_c· ∘ c`` are optional (``peephole=True``). Gates are stored in
the order ``i, f, g(=c̃), o`` as in Keras and ``torch.nn.LSTM``.

Why it is fast: the input-to-state convolution ``W_x* x_t`` does not depend on the
recurrence, so :class:`ConvLSTM2D` runs it once over all ``B*T`` frames of a layer
(one large convolution) and only the state-to-state convolution and the gate math run
inside the time loop. In eager mode the recurrence of a default (tanh/sigmoid, no
peephole) layer is one autograd node (:class:`_FusedConvLSTMLayer`) with a hand-written
backward through time that computes the recurrent weight gradient of all steps as one
convolution; frames are time-major and channels_last inside. Other configurations, and
``torch.compile`` / ``torch.export``, run plain per-step tensor ops (which Inductor fuses).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from nowcast.nn import buffers
from nowcast.nn.backend import settings
from nowcast.nn.conv import (
    conv2d,
    conv2d_add_,
    conv2d_backward,
    conv2d_input_grad,
    fastest_memory_format,
)

Activation = str | Callable[[Tensor], Tensor]
State = tuple[Tensor, Tensor]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    # Keras 3 definition: relu6(x + 3) / 6, the same as torch's hardsigmoid.
    "hard_sigmoid": F.hardsigmoid,
    "relu": F.relu,
    # torch's default slope; pass torch.nn.LeakyReLU(negative_slope=...) for another.
    "leaky_relu": F.leaky_relu,
    "linear": lambda x: x,
}


def get_activation(activation: Activation) -> Callable[[Tensor], Tensor]:
    """Resolve an activation given by name or as a callable (e.g. ``nn.LeakyReLU(0.2)``)."""
    if callable(activation):
        return activation
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; expected one of {sorted(_ACTIVATIONS)} "
            "or a callable such as torch.nn.LeakyReLU(negative_slope=0.2)"
        )
    return _ACTIVATIONS[activation]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return value  # type: ignore[return-value]


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow/Keras "same" padding: output = ceil(size / stride), extra pad at the end."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def conv_output_size(
    size: int,
    kernel: int,
    stride: int = 1,
    padding: str | int = "same",
    dilation: int = 1,
) -> int:
    """Spatial output size of the input-to-state convolution along one axis."""
    if padding == "same":
        return math.ceil(size / stride)
    pad = 0 if padding == "valid" else int(padding)
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def _is_tracing() -> bool:
    """True under torch.compile / torch.export / jit / fx, where the plain gate ops are
    used because the tracer sees through them (and Inductor fuses them)."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_scripting()
        or torch.jit.is_tracing()
        or _fx_tracing()
    )


def _fx_tracing() -> bool:
    # private torch.fx API: without it, fx symbolic tracing is not detected (and fails
    # on the fused autograd function, as it would with any custom Function)
    check = getattr(getattr(torch.fx, "_symbolic_trace", None), "is_fx_symbolic_tracing", None)
    return bool(check()) if check is not None else False


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


class ConvLSTMCell(nn.Module):
    """One ConvLSTM time step.

    Parameters
    ----------
    in_channels, hidden_channels
        Channels of the input frame and of the state ``h``/``c``.
    kernel_size
        Kernel of both convolutions: int or ``(kh, kw)``.
    stride, padding, dilation
        Of the input-to-state convolution, as in Keras ``ConvLSTM2D``: ``padding`` is
        ``"same"`` (output ``ceil(H / stride)``, extra padding at the end as in
        TensorFlow), ``"valid"`` or an int. The state-to-state convolution always has
        stride 1 and "same" padding, so the state keeps its size.
    bias
        Learn gate biases (in the input-to-state convolution).
    peephole
        Add the cell-state terms ``W_ci∘c``, ``W_cf∘c``, ``W_co∘c`` of Shi et al. 2015.
        The weights are per channel (broadcast over space) unless ``frame_size`` gives
        the state's ``(H, W)``, in which case they are full ``(C, H, W)`` tensors as in
        the paper.
    activation, recurrent_activation
        Cell/output activation (default tanh) and gate activation (default sigmoid):
        a name among tanh, sigmoid, hard_sigmoid, relu, leaky_relu, linear, or a callable.
    forget_bias
        Initial forget-gate bias (Keras ``unit_forget_bias``; Jozefowicz et al. 2015).
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding: Literal["same", "valid"] | int = "same",
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        peephole: bool = False,
        activation: Activation = "tanh",
        recurrent_activation: Activation = "sigmoid",
        forget_bias: float = 1.0,
        frame_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or hidden_channels < 1:
            raise ValueError(
                f"in_channels and hidden_channels must be >= 1, got {in_channels}, {hidden_channels}"
            )
        if not (padding in ("same", "valid") or (isinstance(padding, int) and padding >= 0)):
            raise ValueError(f"padding must be 'same', 'valid' or an int >= 0, got {padding!r}")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        self.padding = padding
        self.peephole = peephole
        self.activation_name = activation if isinstance(activation, str) else None
        self.recurrent_activation_name = (
            recurrent_activation if isinstance(recurrent_activation, str) else None
        )
        self.activation = get_activation(activation)
        self.recurrent_activation = get_activation(recurrent_activation)
        self.forget_bias = forget_bias

        kh, kw = self.kernel_size
        self.weight_x = nn.Parameter(torch.empty(4 * hidden_channels, in_channels, kh, kw))
        self.weight_h = nn.Parameter(torch.empty(4 * hidden_channels, hidden_channels, kh, kw))
        self.bias = nn.Parameter(torch.empty(4 * hidden_channels)) if bias else None
        if peephole:
            shape = (hidden_channels, *frame_size) if frame_size else (hidden_channels, 1, 1)
            self.weight_ci = nn.Parameter(torch.zeros(shape))
            self.weight_cf = nn.Parameter(torch.zeros(shape))
            self.weight_co = nn.Parameter(torch.zeros(shape))
        else:
            self.register_parameter("weight_ci", None)
            self.register_parameter("weight_cf", None)
            self.register_parameter("weight_co", None)
        # "same" recurrent padding; symmetric for odd kernels, torch handles even ones.
        self._h_padding: tuple[int, int] | str = (
            (kh // 2, kw // 2) if kh % 2 and kw % 2 else "same"
        )
        # The fused layer (hand-written BPTT) covers the default LSTM with odd kernels,
        # whose "same" recurrent padding is symmetric; anything else runs step-wise.
        self._fusable = (
            not peephole
            and activation == "tanh"
            and recurrent_activation == "sigmoid"
            and kh % 2 == 1
            and kw % 2 == 1
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras defaults: Glorot-uniform input kernel, orthogonal recurrent kernel,
        zero biases with the forget slice at ``forget_bias``, zero peepholes."""
        nn.init.xavier_uniform_(self.weight_x)
        # Keras makes the (kh*kw*C, 4*C) recurrent matrix orthogonal; same matrix here.
        nn.init.orthogonal_(self.weight_h)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()
                n = self.hidden_channels
                self.bias[n : 2 * n] = self.forget_bias
        for w in (self.weight_ci, self.weight_cf, self.weight_co):
            if w is not None:
                nn.init.zeros_(w)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.hidden_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}, "
            f"peephole={self.peephole}"
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """State size ``(H', W')`` for an input frame of ``(height, width)``."""
        return (
            conv_output_size(height, self.kernel_size[0], self.stride[0], self.padding, self.dilation[0]),
            conv_output_size(width, self.kernel_size[1], self.stride[1], self.padding, self.dilation[1]),
        )

    def input_conv(self, x: Tensor) -> Tensor:
        """Input-to-state convolution of frames ``(N, C, H, W)`` -> ``(N, 4*Ch, H', W')``."""
        padding: int | tuple[int, int] = 0 if self.padding == "valid" else self.padding  # type: ignore[assignment]
        if self.padding == "same":
            (pt, pb) = _same_pads(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
            (pl, pr) = _same_pads(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
            if pt == pb and pl == pr:
                padding = (pt, pl)
            else:  # asymmetric: pad explicitly, extra row/column at the end as TF does
                x = F.pad(x, (pl, pr, pt, pb))
                padding = 0
        if self.stride == (1, 1) and self.dilation == (1, 1):
            pad = (padding, padding) if isinstance(padding, int) else tuple(padding)
            return conv2d(x, self.weight_x, self.bias, pad)  # oneDNN or NNPACK, per shape
        return F.conv2d(x, self.weight_x, self.bias, self.stride, padding, self.dilation)

    def init_state(self, x_gates: Tensor) -> State:
        """Zero ``(h, c)`` matching gate pre-activations ``(B, 4*Ch, H', W')`` in shape,
        device, dtype and memory format."""
        b, _, hh, ww = x_gates.shape
        zeros = x_gates.new_zeros(b, self.hidden_channels, hh, ww)
        zeros = zeros.contiguous(memory_format=_memory_format(x_gates))
        return zeros, zeros

    def recurrent_step(self, x_gates: Tensor, state: State) -> State:
        """Advance one step given precomputed input gates ``(B, 4*Ch, H', W')``, with
        plain tensor ops (what torch.compile / torch.export trace and fuse)."""
        h, c = state
        h_gates = F.conv2d(h, self.weight_h, None, 1, self._h_padding)  # (B, 4*Ch, H', W')
        return self._pointwise(x_gates + h_gates, c)

    def run(
        self, x_gates: Tensor, state: State, zero_state: bool = False, consume: bool = False
    ) -> tuple[Tensor, State]:
        """Run the recurrence over precomputed input gates.

        Parameters
        ----------
        x_gates
            ``(T, B, 4*Ch, H', W')``, time-major: the input-to-state convolution of every
            frame, bias included.
        state
            ``(h, c)``, each ``(B, Ch, H', W')``.
        zero_state
            ``h`` is known to be zero (the default initial state): the first recurrent
            convolution, whose result would be zero, is skipped.
        consume
            ``x_gates`` may be overwritten (the layer then computes each step's gates in
            its memory instead of a new buffer); for callers that own it and do not read
            it afterwards.

        Returns
        -------
        ``hs`` ``(T, B, Ch, H', W')`` and the final ``(h, c)``.
        """
        if self._fusable and settings.fused and not _is_tracing():
            if torch.is_grad_enabled():
                hs, c = _FusedConvLSTMLayer.apply(
                    x_gates, self.weight_h, *state, self._h_padding, zero_state, consume
                )
            else:  # inference: same in-place loop, nothing saved
                dtype = x_gates.dtype
                hs, c, *_ = _lstm_forward(
                    x_gates, self.weight_h.to(dtype), self._h_padding,
                    state[0].to(dtype), state[1].to(dtype), save=False, zero_h0=zero_state,
                    consume=consume,
                )
            return hs, (hs[-1], c)
        hs_list = []
        for xg in x_gates.unbind(0):  # unbind: its backward is one stack, not T zero-fills
            state = self.recurrent_step(xg, state)
            hs_list.append(state[0])
        return torch.stack(hs_list), state  # (T, B, Ch, H', W')

    def _pointwise(self, gates: Tensor, c: Tensor) -> State:
        """Gate math on pre-activations ``(B, 4*Ch, H, W)``; fuses under torch.compile."""
        i, f, g, o = gates.chunk(4, dim=1)  # each (B, Ch, H, W)
        if self.weight_ci is not None:
            # In the gates' dtype: under autocast the recurrence stays in bf16/fp16, as in
            # the fused path, instead of being promoted to float32 by the parameters.
            wci, wcf, wco = (w.to(gates.dtype) for w in (self.weight_ci, self.weight_cf, self.weight_co))
            i = i + wci * c
            f = f + wcf * c
        i = self.recurrent_activation(i)
        f = self.recurrent_activation(f)
        c_next = f * c + i * self.activation(g)
        if self.weight_co is not None:
            o = o + wco * c_next
        h_next = self.recurrent_activation(o) * self.activation(c_next)
        return h_next, c_next

    def forward(self, x: Tensor, state: State | None = None) -> State:
        """One step: ``x`` ``(B, C, H, W)`` -> ``(h, c)``, each ``(B, Ch, H', W')``.

        ``state=None`` starts from zeros of the right shape, device, dtype and memory
        format.
        """
        _check_frames(x, 4, 1, self.in_channels, "(B, C, H, W)")
        x_gates = self.input_conv(x)  # (B, 4*Ch, H', W')
        zero_state = state is None
        if state is None:
            state = self.init_state(x_gates)
        else:
            _check_state(state, x_gates, self.hidden_channels, 0)
        hs, state = self.run(x_gates.unsqueeze(0), state, zero_state, consume=True)  # hs: (1, B, Ch, H', W')
        return state


_MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last if ``x`` ``(N, C, H, W)`` is laid out so (and not trivially), else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check_frames(x: Tensor, dims: int, channel_dim: int, channels: int, layout: str) -> None:
    """Shape, channel and dtype check at the top of ``forward``."""
    if x.dim() != dims or x.shape[channel_dim] != channels:
        raise ValueError(f"expected {layout} with C={channels}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point input {layout}, got dtype {x.dtype}")


def _check_state(state: State, x_gates: Tensor, channels: int, layer: int) -> None:
    """Check an initial ``(h, c)`` against gate pre-activations ``(B, 4*Ch, H', W')``."""
    expected = (x_gates.shape[0], channels, *x_gates.shape[-2:])
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(f"state of layer {layer} must be a pair (h, c), got {type(state).__name__}")
    for name, t in zip("hc", state):
        if tuple(t.shape) != tuple(expected):
            raise ValueError(
                f"initial {name} of layer {layer}: expected shape {expected}, got {tuple(t.shape)}"
            )
        if not t.is_floating_point() or t.device != x_gates.device:
            raise ValueError(
                f"initial {name} of layer {layer}: expected a floating-point tensor on "
                f"{x_gates.device}, got {t.dtype} on {t.device}"
            )


def _per_layer(value, num_layers: int, name: str, scalar_types=(int, float, str)) -> list:
    """Broadcast a scalar (or a tuple, e.g. (kh, kw)) to one value per layer."""
    if isinstance(value, (list, _ListLike)) and not isinstance(value, tuple):
        value = list(value)
        if len(value) != num_layers:
            raise ValueError(f"{name} has {len(value)} entries but there are {num_layers} layers")
        return value
    return [value] * num_layers


class _ListLike:  # placeholder base so omegaconf ListConfig can be registered below
    pass


try:  # Hydra passes lists as ListConfig; treat them as per-layer lists.
    from omegaconf import ListConfig

    _ListLike = ListConfig  # type: ignore[misc,assignment]  # noqa: F811
except ImportError:  # pragma: no cover - omegaconf is a dependency of the app, not the layer
    pass


def _num_layers(num_layers: int | None, **values) -> int:
    lengths = {
        k: len(v)
        for k, v in values.items()
        if isinstance(v, (list, _ListLike)) and not isinstance(v, tuple)
    }
    if num_layers is None:
        distinct = set(lengths.values())
        if len(distinct) > 1:
            raise ValueError(f"per-layer arguments disagree on the number of layers: {lengths}")
        num_layers = distinct.pop() if distinct else 1
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return num_layers


class ConvLSTM2D(nn.Module):
    """A stack of ConvLSTM layers run over a sequence.

    Parameters
    ----------
    in_channels
        Channels ``C`` of the input frames.
    hidden_channels
        State channels: one int for every layer or a list with one per layer.
    kernel_size, stride, padding, dilation
        As in :class:`ConvLSTMCell`; each one value or a list with one per layer. A
        Python tuple ``(kh, kw)`` is one rectangular kernel for every layer.
    num_layers
        Number of layers; inferred from the per-layer lists when ``None``.
    bias, peephole, activation, recurrent_activation, forget_bias
        As in :class:`ConvLSTMCell`, shared by all layers.
    dropout
        Dropout on the outputs of every layer but the last (as ``torch.nn.LSTM``).
    data_format
        ``"channels_first"``: input and output ``(B, T, C, H, W)``;
        ``"channels_last"``: ``(B, T, H, W, C)``.
    return_sequences
        Return every time step ``(B, T, ...)`` (default) or only the last ``(B, ...)``.
    return_state
        Also return the final ``[(h, c), ...]`` of every layer.
    return_all_layers
        Return a list with every layer's output instead of the last layer's.
    stateful
        Keep the final state and use it as the initial state of the next call, until
        :meth:`reset_state`. The carried state is detached (truncated BPTT).
    checkpoint_steps
        When > 0, recompute the activations of each chunk of this many time steps in
        the backward pass instead of storing them (gradient checkpointing): memory for
        long sequences at high resolution, at the price of one more forward.
    frame_size
        ``(H, W)`` of the input frames; needed only for full-size peephole weights (each
        layer's state size follows from it with :meth:`output_size`).
    memory_format
        Memory layout of the frames inside, per layer: ``"channels_last"`` (on CPU oneDNN
        runs the 3x3 convolutions ~1.3x faster than NCHW, see ``docs/benchmarks.md``, and
        cuDNN's tensor-core kernels prefer it too), ``"contiguous"`` (NCHW), which on
        CPUs lets float32 convolutions run on NNPACK's Winograd/FFT kernels where those
        are faster per shape (:mod:`nowcast.nn.conv`; 5x5 kernels), or ``"auto"``
        (default): channels_last, except CPU float32 layers outside autocast and
        deterministic mode, which take the layout in which a two-step training pass of
        the layer ran faster, timed the first time a frame shape is met (~12 s for the
        two 64-channel layers of the S benchmark config; :func:`nowcast.nn.conv.
        fastest_memory_format`). The results are the same up to float32 rounding; only
        speed differs.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int | Sequence[int],
        kernel_size: int | Sequence = 3,
        num_layers: int | None = None,
        stride: int | Sequence = 1,
        padding: Literal["same", "valid"] | int | Sequence = "same",
        dilation: int | Sequence = 1,
        bias: bool = True,
        peephole: bool = False,
        activation: Activation = "tanh",
        recurrent_activation: Activation = "sigmoid",
        forget_bias: float = 1.0,
        dropout: float = 0.0,
        data_format: Literal["channels_first", "channels_last"] = "channels_first",
        return_sequences: bool = True,
        return_state: bool = False,
        return_all_layers: bool = False,
        stateful: bool = False,
        checkpoint_steps: int = 0,
        frame_size: Sequence[int] | None = None,
        memory_format: Literal["auto", "channels_last", "contiguous"] = "auto",
    ) -> None:
        super().__init__()
        if memory_format not in _MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {_MEMORY_FORMATS}, got {memory_format!r}")
        if checkpoint_steps < 0:
            raise ValueError(f"checkpoint_steps must be >= 0, got {checkpoint_steps}")
        if data_format not in ("channels_first", "channels_last"):
            raise ValueError(
                f"data_format must be 'channels_first' or 'channels_last', got {data_format!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = _num_layers(
            num_layers,
            hidden_channels=hidden_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
        )
        hidden = [int(h) for h in _per_layer(hidden_channels, n, "hidden_channels")]
        kernels = _per_layer(kernel_size, n, "kernel_size")
        strides = _per_layer(stride, n, "stride")
        paddings = _per_layer(padding, n, "padding")
        dilations = _per_layer(dilation, n, "dilation")

        self.in_channels = in_channels
        self.hidden_channels = hidden
        self.num_layers = n
        self.data_format = data_format
        self.return_sequences = return_sequences
        self.return_state = return_state
        self.return_all_layers = return_all_layers
        self.stateful = stateful
        self.checkpoint_steps = checkpoint_steps
        self.dropout = dropout
        self.memory_format = memory_format
        self.cells = nn.ModuleList()
        size = None if frame_size is None else _pair(frame_size, "frame_size")  # type: ignore[arg-type]
        for layer in range(n):
            if size is not None:  # this layer's state size, for full-size peepholes
                size = tuple(
                    conv_output_size(s, k, st, paddings[layer], d)
                    for s, k, st, d in zip(
                        size,
                        _pair(kernels[layer], "kernel_size"),
                        _pair(strides[layer], "stride"),
                        _pair(dilations[layer], "dilation"),
                    )
                )
            self.cells.append(
                ConvLSTMCell(
                    in_channels if layer == 0 else hidden[layer - 1],
                    hidden[layer],
                    kernel_size=tuple(kernels[layer]) if not isinstance(kernels[layer], int) else kernels[layer],
                    stride=strides[layer] if isinstance(strides[layer], int) else tuple(strides[layer]),
                    padding=paddings[layer],
                    dilation=dilations[layer] if isinstance(dilations[layer], int) else tuple(dilations[layer]),
                    bias=bias,
                    peephole=peephole,
                    activation=activation,
                    recurrent_activation=recurrent_activation,
                    forget_bias=forget_bias,
                    frame_size=size,
                )
            )
        self._state: list[State] | None = None

    def reset_state(self) -> None:
        """Forget the carried state of ``stateful=True``."""
        self._state = None

    def output_size(self, height: int, width: int) -> list[tuple[int, int]]:
        """State size ``(H', W')`` of every layer for input frames of ``(height, width)``."""
        sizes = []
        for cell in self.cells:
            height, width = cell.output_size(height, width)
            sizes.append((height, width))
        return sizes

    def _layer_formats(self, b: int, height: int, width: int) -> list[torch.memory_format]:
        """The memory format of each layer's frames and states for ``B = b`` frames of
        ``height x width`` (see ``memory_format``)."""
        if self.memory_format == "channels_last" or (self.memory_format == "auto" and _is_tracing()):
            return [torch.channels_last] * self.num_layers
        if self.memory_format == "contiguous":
            return [torch.contiguous_format] * self.num_layers
        formats = []
        frame = (self.in_channels, height, width)
        for cell, (hh, ww) in zip(self.cells, self.output_size(height, width)):
            formats.append(fastest_memory_format(
                (b, cell.hidden_channels, hh, ww), cell.weight_h, cell._h_padding,
                step=lambda fmt, cell=cell, frame=frame: _timing_step(cell, b, frame, fmt), key=frame,
            ))
            frame = (cell.hidden_channels, hh, ww)
        return formats

    def _check_input(self, x: Tensor) -> Tensor:
        """Check ``x`` and return it as ``(B, T, C, H, W)`` (a view for channels_last)."""
        if self.data_format == "channels_last":
            _check_frames(x, 5, -1, self.in_channels, "(B, T, H, W, C)")
            return x.permute(0, 1, 4, 2, 3)  # (B, T, C, H, W), a view
        _check_frames(x, 5, 2, self.in_channels, "(B, T, C, H, W)")
        return x

    def _to_format(self, y: Tensor) -> Tensor:
        if self.data_format == "channels_last":
            return y.movedim(-3, -1)  # (..., C, H, W) -> (..., H, W, C)
        return y

    def forward(self, x: Tensor, initial_state: Sequence[State] | None = None):
        """Run the stack over a sequence.

        Parameters
        ----------
        x
            ``(B, T, C, H, W)`` (or ``(B, T, H, W, C)`` with ``channels_last``).
        initial_state
            ``[(h, c), ...]``, one pair per layer, each ``(B, Ch_l, H_l, W_l)``; zeros
            (or the carried state when ``stateful``) if ``None``.

        Returns
        -------
        The last layer's output ``(B, T, Ch, H', W')`` (``(B, Ch, H', W')`` with
        ``return_sequences=False``), or a list of every layer's with
        ``return_all_layers=True``; with ``return_state=True`` a tuple
        ``(output, [(h, c), ...])``. Outputs are views of time-major buffers (not
        contiguous); ``.contiguous()`` them if you need to ``.view`` them.
        """
        x = self._check_input(x)
        b, t = x.shape[:2]
        if initial_state is None and self.stateful and self._state is not None:
            initial_state = self._state
        if initial_state is not None and len(initial_state) != self.num_layers:
            raise ValueError(
                f"initial_state must have one (h, c) per layer ({self.num_layers}), "
                f"got {len(initial_state)}"
            )
        # Time-major inside: the frames of step t are then one contiguous block, which
        # the recurrent convolution reads and writes without copies; this transpose
        # copies only the (usually few-channel) input once.
        frames = x.transpose(0, 1).reshape(t * b, *x.shape[2:])  # (T*B, C, H, W)
        outputs: list[Tensor] = []
        states: list[State] = []
        checkpointing = self.checkpoint_steps > 0 and torch.is_grad_enabled() and self.training
        inference = not torch.is_grad_enabled() and settings.fused and not _is_tracing()
        formats = self._layer_formats(b, *x.shape[-2:])
        for layer, cell in enumerate(self.cells):
            # .to, not .contiguous: a one-channel input is contiguous in both layouts, and
            # .contiguous keeps its NCHW strides, from which the convolution's output and
            # so the whole layer would follow NCHW (measured ~1.3x slower per step at S).
            frames = frames.to(memory_format=formats[layer])
            # All input-to-state convolutions of the layer at once, outside the loop (with
            # checkpointing, per chunk: the gates are then recomputed, not stored; in
            # inference, per chunk of _INFERENCE_CHUNK steps, see _run_inference).
            if checkpointing:
                frames_now = frames[:b]  # only to shape the zero state
            elif inference:
                frames_now = frames[: b * _INFERENCE_CHUNK]  # the first chunk
            else:
                frames_now = frames
            x_gates = cell.input_conv(frames_now)  # (T*B or fewer, 4Ch, H', W')
            x_gates = x_gates.unflatten(0, (-1, b))  # (T, B, 4Ch, H', W'), a view
            if initial_state is None:
                state = cell.init_state(x_gates[0])
            else:
                state = tuple(initial_state[layer])  # type: ignore[assignment]
                _check_state(state, x_gates[0], cell.hidden_channels, layer)
                state = tuple(s.to(memory_format=formats[layer]) for s in state)
            zero = initial_state is None
            if checkpointing:
                hs, state = self._run_checkpointed(cell, frames.unflatten(0, (t, b)), state, zero, formats[layer])
            elif inference:
                hs, state = _run_inference(cell, frames.unflatten(0, (t, b)), x_gates, state, zero, formats[layer])
            else:
                hs, state = cell.run(x_gates, state, zero, consume=True)  # hs: (T, B, Ch, H', W')
            states.append(state)
            outputs.append(hs)
            if self.dropout and self.training and layer < self.num_layers - 1:
                hs = F.dropout(hs, self.dropout, training=True)
            frames = hs.flatten(0, 1)  # (T*B, Ch, H', W'), a view
        if self.stateful:
            # clone: h is a view of the layer's whole (T, B, ...) output buffer
            self._state = [(h.detach().clone(), c.detach().clone()) for h, c in states]

        def finish(y: Tensor) -> Tensor:  # (T, B, Ch, H', W') -> the caller's layout
            return self._to_format(y.transpose(0, 1) if self.return_sequences else y[-1])

        result = [finish(y) for y in outputs] if self.return_all_layers else finish(outputs[-1])
        if self.return_state:
            return result, states
        return result

    def _run_checkpointed(
        self, cell: ConvLSTMCell, frames: Tensor, state: State, zero_state: bool, fmt: torch.memory_format
    ) -> tuple[Tensor, State]:
        """``frames`` ``(T, B, C, H, W)`` -> ``hs`` ``(T, B, Ch, H', W')``, final ``(h, c)``,
        recomputing each chunk of ``checkpoint_steps`` steps in the backward pass."""
        hs_parts = []
        for part in frames.split(self.checkpoint_steps):  # split: one backward node, no zero-fills
            # Non-reentrant checkpoint: only the chunk's input frames and state are kept;
            # its input gates, gate activations and cell states are recomputed.
            hs, c = checkpoint(_run_chunk, cell, part, *state, zero_state, fmt, use_reentrant=False)
            hs_parts.append(hs)
            state, zero_state = (hs[-1], c), False
        return torch.cat(hs_parts), state

    @torch.no_grad()
    def step(self, x_t: Tensor, states: Sequence[State] | None = None) -> tuple[Tensor, list[State]]:
        """Streaming inference: advance every layer by one frame.

        Parameters
        ----------
        x_t
            ``(B, C, H, W)`` (``(B, H, W, C)`` with ``channels_last``).
        states
            ``[(h, c), ...]`` from the previous call, or ``None`` to start from zeros.

        Returns
        -------
        The last layer's ``h`` ``(B, Ch, H', W')`` in the input's layout, and the new
        ``[(h, c), ...]``.
        """
        if self.data_format == "channels_last":
            _check_frames(x_t, 4, -1, self.in_channels, "(B, H, W, C)")
            x_t = x_t.permute(0, 3, 1, 2)  # (B, C, H, W)
        else:
            _check_frames(x_t, 4, 1, self.in_channels, "(B, C, H, W)")
        if states is not None and len(states) != self.num_layers:
            raise ValueError(
                f"states must have one (h, c) per layer ({self.num_layers}), got {len(states)}"
            )
        new_states: list[State] = []
        inp = x_t
        formats = self._layer_formats(x_t.shape[0], *x_t.shape[-2:])
        for layer, cell in enumerate(self.cells):
            fmt = formats[layer]
            state = None if states is None else tuple(s.to(memory_format=fmt) for s in states[layer])
            h, c = cell(inp.to(memory_format=fmt), state)  # .to: see forward
            new_states.append((h, c))
            inp = h
        return self._to_format(inp), new_states

    # -- weights in the Keras layout, for porting models to and from Keras/TF.js -------
    def get_weights(self) -> list[dict[str, np.ndarray]]:
        """Per layer ``{"kernel", "recurrent_kernel", "bias"}`` as NumPy arrays in the Keras
        ``ConvLSTM2D`` layout: kernels ``(kh, kw, C_in, 4*Ch)``, gates ``i, f, c, o``.
        Peephole weights, if any, are ``"peephole_i/f/o"`` of shape ``(Ch, ...)``."""
        weights = []
        for cell in self.cells:
            w = {
                "kernel": cell.weight_x.detach().permute(2, 3, 1, 0).cpu().numpy(),
                "recurrent_kernel": cell.weight_h.detach().permute(2, 3, 1, 0).cpu().numpy(),
            }
            if cell.bias is not None:
                w["bias"] = cell.bias.detach().cpu().numpy()
            if cell.peephole:
                w["peephole_i"] = cell.weight_ci.detach().cpu().numpy()
                w["peephole_f"] = cell.weight_cf.detach().cpu().numpy()
                w["peephole_o"] = cell.weight_co.detach().cpu().numpy()
            weights.append(w)
        return weights

    @torch.no_grad()
    def set_weights(self, weights: Sequence[dict[str, np.ndarray]]) -> None:
        """Load weights in the layout of :meth:`get_weights` (shapes are checked)."""
        if len(weights) != self.num_layers:
            raise ValueError(f"expected weights for {self.num_layers} layers, got {len(weights)}")
        for layer, (cell, w) in enumerate(zip(self.cells, weights)):
            pairs = [
                ("kernel", cell.weight_x, (2, 3, 1, 0)),
                ("recurrent_kernel", cell.weight_h, (2, 3, 1, 0)),
            ]
            if cell.bias is not None:
                pairs.append(("bias", cell.bias, None))
            if cell.peephole:
                pairs += [
                    ("peephole_i", cell.weight_ci, None),
                    ("peephole_f", cell.weight_cf, None),
                    ("peephole_o", cell.weight_co, None),
                ]
            for key, param, perm in pairs:
                if key not in w:
                    raise ValueError(f"layer {layer}: missing {key!r}; got keys {sorted(w)}")
                value = torch.as_tensor(np.asarray(w[key]))
                if perm is not None:
                    value = value.permute(3, 2, 0, 1)  # (kh, kw, Cin, 4Ch) -> (4Ch, Cin, kh, kw)
                if value.shape != param.shape:
                    raise ValueError(
                        f"layer {layer} {key}: expected shape "
                        f"{tuple(param.permute(*perm).shape) if perm else tuple(param.shape)}, "
                        f"got {tuple(np.asarray(w[key]).shape)}"
                    )
                param.copy_(value)


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


class MaxPool3D(nn.Module):
    """Max pooling over time, height and width of a ``(B, T, C, H, W)`` sequence.

    ``data_format="channels_last"`` takes and returns ``(B, T, H, W, C)``. Sizes must
    fit the pooling exactly (``(size - pool) % stride == 0``) unless ``ceil_mode=True``,
    which keeps the partial windows at the end.
    """

    def __init__(
        self,
        pool_size: int | Sequence[int] = (2, 2, 2),
        stride: int | Sequence[int] | None = None,
        data_format: Literal["channels_first", "channels_last"] = "channels_first",
        ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        self.pool_size = _triple(pool_size, "pool_size")
        self.stride = self.pool_size if stride is None else _triple(stride, "stride")
        if data_format not in ("channels_first", "channels_last"):
            raise ValueError(
                f"data_format must be 'channels_first' or 'channels_last', got {data_format!r}"
            )
        self.data_format = data_format
        self.ceil_mode = ceil_mode

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}, stride={self.stride}, ceil_mode={self.ceil_mode}"

    def output_size(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """``(T', H', W')`` after pooling, or ``ValueError`` if a size does not fit."""
        out = []
        for name, size, k, s in zip(("T", "H", "W"), (t, h, w), self.pool_size, self.stride):
            if size < k and not self.ceil_mode:
                raise ValueError(f"MaxPool3D: {name}={size} is smaller than the pool size {k}")
            if (size - k) % s and not self.ceil_mode:
                raise ValueError(
                    f"MaxPool3D: {name}={size} does not fit pool {k} with stride {s} "
                    f"((size - pool) % stride != 0); use sizes that divide or ceil_mode=True"
                )
            n = math.ceil((size - k) / s) + 1 if self.ceil_mode else (size - k) // s + 1
            out.append(max(n, 1))
        return tuple(out)  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, C, H, W)`` -> ``(B, T', C, H', W')`` (or the channels_last layouts)."""
        if x.dim() != 5:
            layout = "(B, T, C, H, W)" if self.data_format == "channels_first" else "(B, T, H, W, C)"
            raise ValueError(f"expected {layout}, got {tuple(x.shape)}")
        if self.data_format == "channels_last":
            x = x.permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)
        else:
            x = x.transpose(1, 2)  # (B, C, T, H, W)
        self.output_size(*x.shape[2:])
        y = F.max_pool3d(x, self.pool_size, self.stride, ceil_mode=self.ceil_mode)  # (B, C, T', H', W')
        if self.data_format == "channels_last":
            return y.permute(0, 2, 3, 4, 1)
        return y.transpose(1, 2)


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} must be an int or (t, h, w), got {value!r}")
    return value  # type: ignore[return-value]
