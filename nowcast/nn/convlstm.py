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

This file is the reference: read :meth:`ConvLSTMCell.recurrent_step` and
:meth:`ConvLSTMCell._pointwise` for the equations, :meth:`ConvLSTM2D.forward` for the
stack. One structural choice makes even the reference fast: the input-to-state
convolution ``W_x* x_t`` does not depend on the recurrence, so :class:`ConvLSTM2D` runs
it once over all ``T*B`` frames of a layer (one large convolution), and only the
state-to-state convolution and the gate math run inside the time loop.

The fast paths (the fused recurrence with hand-written backpropagation through time,
chunked inference, the CPU kernel and layout choices, the buffer pool) live in
:mod:`nowcast.nn.fused`, :mod:`nowcast.nn.conv` and :mod:`nowcast.nn.buffers`, and are
switched by :data:`nowcast.nn.backend.settings` alone; ``with backend.reference():``
runs this file's plain ops only. ``torch.compile`` / ``torch.export`` always trace the
plain ops (which Inductor fuses).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nowcast.nn import fused
from nowcast.nn.backend import settings
from nowcast.nn.conv import conv2d, fastest_memory_format
from nowcast.nn.fused import (  # noqa: F401 - _FusedConvLSTMLayer: tests reach it here
    _INFERENCE_CHUNK,
    _FusedConvLSTMLayer,
    _run_chunk,
    _run_inference,
    _timing_step,
)
from nowcast.nn.pooling import MaxPool3D  # noqa: F401 - was defined here

Activation = str | Callable[[Tensor], Tensor]
State = tuple[Tensor, Tensor]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    # Keras 3 definition: relu6(x + 3) / 6, the same as torch's hardsigmoid.
    "hard_sigmoid": F.hardsigmoid,
    # Keras 2 / tf.keras definition, clip(0.2 x + 0.5, 0, 1): what models saved with them
    # used (the default recurrent activation of their ConvLSTM2D).
    "hard_sigmoid_keras2": lambda x: (0.2 * x + 0.5).clamp(0.0, 1.0),
    "relu": F.relu,
    # torch's default slope; pass torch.nn.LeakyReLU(negative_slope=...) for another.
    "leaky_relu": F.leaky_relu,
    "linear": lambda x: x,
}


def get_activation(activation: Activation | None) -> Callable[[Tensor], Tensor]:
    """Resolve an activation given by name (Keras names; ``None`` is ``"linear"``, as in
    Keras) or as a callable (e.g. ``nn.LeakyReLU(0.2)``)."""
    if callable(activation):
        return activation
    if activation is None:
        activation = "linear"
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; expected one of {sorted(_ACTIVATIONS)} "
            "(None = 'linear'; 'hard_sigmoid' is Keras 3's relu6(x + 3) / 6, "
            "'hard_sigmoid_keras2' the clip(0.2 x + 0.5, 0, 1) of Keras 2 / tf.keras) "
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
        # torch < 2.5 has no is_exporting; torch.export runs under Dynamo there (is_compiling)
        or getattr(torch.compiler, "is_exporting", lambda: False)()
        or torch.jit.is_scripting()
        or torch.jit.is_tracing()
        or _fx_tracing()
    )


def _fx_tracing() -> bool:
    # private torch.fx API: without it, fx symbolic tracing is not detected (and fails
    # on the fused autograd function, as it would with any custom Function)
    check = getattr(getattr(torch.fx, "_symbolic_trace", None), "is_fx_symbolic_tracing", None)
    return bool(check()) if check is not None else False


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
        if isinstance(padding, str):
            padding = padding.lower()  # Keras configs say "same", "SAME" or "Same"
        if not (padding in ("same", "valid") or (isinstance(padding, int) and padding >= 0)):
            raise ValueError(
                f"padding must be 'same' or 'valid' (any case, as in Keras) or an int >= 0, "
                f"got {padding!r}"
            )
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

    def recurrent_step(self, x_gates: Tensor, state: State, h_mask: Tensor | None = None) -> State:
        """Advance one step given precomputed input gates ``(B, 4*Ch, H', W')``, with
        plain tensor ops (what torch.compile / torch.export trace and fuse). ``h_mask``
        (``(B, Ch, H', W')``, recurrent dropout) multiplies ``h`` before its convolution."""
        h, c = state
        if h_mask is not None:
            h = h * h_mask  # (B, Ch, H', W')
        h_gates = F.conv2d(h, self.weight_h, None, 1, self._h_padding)  # (B, 4*Ch, H', W')
        return self._pointwise(x_gates + h_gates, c)

    def run(
        self, x_gates: Tensor, state: State, zero_state: bool = False, consume: bool = False,
        h_mask: Tensor | None = None,
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
        h_mask
            Recurrent dropout: ``(B, Ch, H', W')`` multiplies ``h`` before every recurrent
            convolution (one mask for all steps and gates, as Keras).

        Returns
        -------
        ``hs`` ``(T, B, Ch, H', W')`` and the final ``(h, c)``.
        """
        if h_mask is None and fused.applies(self):  # the fast path: same equations
            return fused.run(self, x_gates, state, zero_state, consume)
        hs_list = []
        for xg in x_gates.unbind(0):  # unbind: its backward is one stack, not T zero-fills
            state = self.recurrent_step(xg, state, h_mask)
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
    dropout, recurrent_dropout
        Keras-style dropout inside every layer while training: a fraction of the input
        frame's units (``dropout``) and of ``h`` before the recurrent convolution
        (``recurrent_dropout``) is zeroed, one mask per sequence for all steps and gates.
        A ``recurrent_dropout`` layer runs step by step (not the fused fast path).
    layer_dropout
        Dropout on the outputs of every layer but the last (as ``torch.nn.LSTM``'s
        ``dropout``).
    go_backwards
        Process the sequence last frame first and return the outputs in that order
        (Keras ``go_backwards``).
    state_layout
        Layout of the returned states (and of ``initial_state``): ``"channels_first"``
        ``(B, Ch, H', W')`` (default), or ``"data_format"``, which with
        ``data_format="channels_last"`` is Keras's ``(B, H', W', Ch)``.
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
        recurrent_dropout: float = 0.0,
        layer_dropout: float = 0.0,
        go_backwards: bool = False,
        state_layout: Literal["channels_first", "data_format"] = "channels_first",
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
        for name, value in (("dropout", dropout), ("recurrent_dropout", recurrent_dropout),
                            ("layer_dropout", layer_dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if recurrent_dropout and checkpoint_steps:
            raise ValueError("recurrent_dropout and checkpoint_steps cannot be combined")
        if state_layout not in ("channels_first", "data_format"):
            raise ValueError(
                f"state_layout must be 'channels_first' or 'data_format', got {state_layout!r}"
            )
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
        self.recurrent_dropout = recurrent_dropout
        self.layer_dropout = layer_dropout
        self.go_backwards = go_backwards
        self.state_layout = state_layout
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
        if self.go_backwards:
            x = x.flip(1)  # (B, T, C, H, W), last frame first
        if initial_state is not None:
            initial_state = [self._state_in(s) for s in initial_state]
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
        recurrent_dropout = self.recurrent_dropout > 0 and self.training
        inference = (not torch.is_grad_enabled() and settings.fused and not _is_tracing()
                     and not recurrent_dropout)
        formats = self._layer_formats(b, *x.shape[-2:])
        for layer, cell in enumerate(self.cells):
            if self.dropout and self.training:  # Keras: one input mask for all steps
                mask = F.dropout(frames.new_ones(1, b, *frames.shape[1:]), self.dropout)  # (1, B, C, H, W)
                frames = (frames.unflatten(0, (t, b)) * mask).flatten(0, 1)  # (T*B, C, H, W)
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
                h_mask = None
                if recurrent_dropout:  # Keras: one mask on h for all steps and gates
                    h_mask = F.dropout(torch.ones_like(state[0]), self.recurrent_dropout)  # (B, Ch, H', W')
                hs, state = cell.run(x_gates, state, zero, consume=True, h_mask=h_mask)  # hs: (T, B, Ch, H', W')
            states.append(state)
            outputs.append(hs)
            if self.layer_dropout and self.training and layer < self.num_layers - 1:
                hs = F.dropout(hs, self.layer_dropout, training=True)
            frames = hs.flatten(0, 1)  # (T*B, Ch, H', W'), a view
        if self.stateful:
            # clone: h is a view of the layer's whole (T, B, ...) output buffer
            self._state = [(h.detach().clone(), c.detach().clone()) for h, c in states]

        def finish(y: Tensor) -> Tensor:  # (T, B, Ch, H', W') -> the caller's layout
            return self._to_format(y.transpose(0, 1) if self.return_sequences else y[-1])

        result = [finish(y) for y in outputs] if self.return_all_layers else finish(outputs[-1])
        if self.return_state:
            return result, [self._state_out(s) for s in states]
        return result

    def _keras_states(self) -> bool:
        return self.state_layout == "data_format" and self.data_format == "channels_last"

    def _state_in(self, state: State) -> State:
        """An initial ``(h, c)`` in ``state_layout`` -> ``(B, Ch, H', W')`` each."""
        if self._keras_states() and isinstance(state, (tuple, list)):
            return tuple(s.permute(0, 3, 1, 2) if s.dim() == 4 else s for s in state)  # type: ignore[return-value]
        return state

    def _state_out(self, state: State) -> State:
        """``(h, c)`` ``(B, Ch, H', W')`` -> the layout of ``state_layout``."""
        if self._keras_states():
            return tuple(s.permute(0, 2, 3, 1) for s in state)  # type: ignore[return-value]  # (B, H', W', Ch)
        return state

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
    def set_weights(self, weights: Sequence) -> None:
        """Load weights in the Keras ``ConvLSTM2D`` layout (shapes are checked).

        ``weights`` is one entry per layer, each either the dict of :meth:`get_weights`
        or Keras's list ``[kernel, recurrent_kernel, bias]`` (``layer.get_weights()``;
        no ``bias`` with ``bias=False``); or one flat list of arrays, e.g. a single Keras
        layer's ``get_weights()`` for a one-layer stack, or several layers' concatenated.
        """
        for layer, (cell, w) in enumerate(zip(self.cells, self._weights_per_layer(weights), strict=True)):
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
                    if value.dim() != 4:
                        raise ValueError(
                            f"layer {layer} {key}: expected shape "
                            f"{tuple(param.permute(*perm).shape)} (kh, kw, C_in, 4*Ch), "
                            f"got {tuple(value.shape)}"
                        )
                    value = value.permute(3, 2, 0, 1)  # (kh, kw, Cin, 4Ch) -> (4Ch, Cin, kh, kw)
                if value.shape != param.shape:
                    raise ValueError(
                        f"layer {layer} {key}: expected shape "
                        f"{tuple(param.permute(*perm).shape) if perm else tuple(param.shape)}, "
                        f"got {tuple(np.asarray(w[key]).shape)}"
                    )
                param.copy_(value)

    def _weights_per_layer(self, weights: Sequence) -> list[dict]:
        """Normalise the forms :meth:`set_weights` accepts to one dict per layer."""
        def is_array(v) -> bool:
            return isinstance(v, (np.ndarray, Tensor)) or (
                hasattr(v, "shape") and hasattr(v, "__array__"))

        names = ["kernel", "recurrent_kernel"] + (["bias"] if self.cells[0].bias is not None else [])
        if self.cells[0].peephole:
            names += ["peephole_i", "peephole_f", "peephole_o"]
        weights = list(weights)
        if weights and all(is_array(v) for v in weights):  # one flat list of arrays
            want = len(names) * self.num_layers
            if len(weights) != want:
                raise ValueError(
                    f"expected {want} arrays ({', '.join(names)} for each of "
                    f"{self.num_layers} layer(s)), got {len(weights)}"
                )
            weights = [weights[i : i + len(names)] for i in range(0, want, len(names))]
        if len(weights) != self.num_layers:
            raise ValueError(f"expected weights for {self.num_layers} layers, got {len(weights)}")
        out = []
        for layer, w in enumerate(weights):
            if isinstance(w, dict):
                out.append(w)
            elif isinstance(w, (list, tuple)):
                if len(w) != len(names):
                    raise ValueError(
                        f"layer {layer}: expected {len(names)} arrays ({', '.join(names)}), got {len(w)}"
                    )
                out.append(dict(zip(names, w, strict=True)))
            else:
                raise ValueError(
                    f"layer {layer}: expected a dict or a list of arrays, got {type(w).__name__}"
                )
        return out

    # -- Keras configs -------------------------------------------------------------------
    @classmethod
    def from_keras_config(
        cls, config: dict, in_channels: int | None = None, keras_version: int = 3,
        strict: bool = True,
    ) -> ConvLSTM2D:
        """Build the layer a Keras ``ConvLSTM2D`` config dict describes (``layer.get_config()``
        or the ``"config"`` of a layer in a saved model's JSON), one layer::

            layer = ConvLSTM2D.from_keras_config(keras_layer.get_config(), in_channels=3)
            layer.set_weights(keras_layer.get_weights())

        ``in_channels`` may be left out where the config carries the input shape
        (``build_config``). ``keras_version=2`` reads ``"hard_sigmoid"`` as Keras 2 /
        tf.keras's ``clip(0.2 x + 0.5, 0, 1)``. Options this layer cannot reproduce
        (regularizers, constraints, initializers other than Keras's defaults, masking
        options) are each named in one ``ValueError`` (a warning with ``strict=False``).
        """
        return cls(**keras_config_kwargs(config, in_channels, keras_version, strict))


# -- Keras configs ---------------------------------------------------------------------
#: Keras ConvLSTM2D options without effect on the layer's function here.
_KERAS_IGNORED = {"name", "trainable", "dtype", "seed", "unroll", "build_config", "compile_config"}
_KERAS_DEFAULT_INITIALIZERS = {
    "kernel_initializer": "GlorotUniform",
    "recurrent_initializer": "Orthogonal",
    "bias_initializer": "Zeros",
}


def _keras_name(value) -> str | None:
    """``"tanh"``, or the class/function name of a serialised Keras object."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        config = value.get("config")
        if isinstance(config, str):  # {"class_name": "function", "config": "tanh"}
            return config
        return value.get("class_name")
    raise ValueError(f"cannot read a Keras name from {value!r}")


def keras_config_kwargs(
    config: dict, in_channels: int | None = None, keras_version: int = 3, strict: bool = True
) -> dict:
    """The :class:`ConvLSTM2D` arguments for a Keras ``ConvLSTM2D`` config (see
    :meth:`ConvLSTM2D.from_keras_config`)."""
    import warnings

    config = dict(config.get("config", config)) if "class_name" in config else dict(config)
    if "filters" not in config:
        raise ValueError(f"not a Keras ConvLSTM2D config: no 'filters' (keys: {sorted(config)})")
    if in_channels is None:
        shape = (config.get("build_config") or {}).get("input_shape")
        if shape:
            channels_last = config.get("data_format", "channels_last") == "channels_last"
            in_channels = shape[-1] if channels_last else shape[2]
    if in_channels is None:
        raise ValueError("the Keras config has no input shape: pass in_channels")
    problems = []
    for key in ("kernel_regularizer", "recurrent_regularizer", "bias_regularizer",
                "activity_regularizer", "kernel_constraint", "recurrent_constraint",
                "bias_constraint"):
        if config.get(key) is not None:
            problems.append(f"{key}={_keras_name(config[key])!r} (not supported)")
    for key, default in _KERAS_DEFAULT_INITIALIZERS.items():
        name = _keras_name(config.get(key))
        if name is not None and name.replace("_", "").lower() != default.lower():
            problems.append(f"{key}={name!r} (only Keras's default {default} is reproduced)")
    if config.get("zero_output_for_mask"):
        problems.append("zero_output_for_mask=True (masks are not supported)")
    known = {
        "filters", "kernel_size", "strides", "padding", "data_format", "dilation_rate",
        "activation", "recurrent_activation", "use_bias", "unit_forget_bias",
        "return_sequences", "return_state", "go_backwards", "stateful", "dropout",
        "recurrent_dropout", "zero_output_for_mask", "kernel_initializer",
        "recurrent_initializer", "bias_initializer", *_KERAS_IGNORED,
    }
    problems += [f"{key} (unknown option)" for key in sorted(set(config) - known)
                 if not key.endswith(("_regularizer", "_constraint"))]
    if problems:
        message = "Keras ConvLSTM2D options not supported: " + "; ".join(problems)
        if strict:
            raise ValueError(message)
        warnings.warn(message + " (ignored)", stacklevel=3)

    def activation(key: str, default: str):
        name = _keras_name(config.get(key, default))
        if name == "hard_sigmoid" and keras_version == 2:
            return "hard_sigmoid_keras2"
        return "linear" if name is None else name

    def pair(key: str, default) -> tuple[int, int]:
        value = config.get(key, default)  # a JSON list [3, 3] is ONE kernel, not two layers
        return _pair(value if isinstance(value, int) else tuple(value), key)

    data_format = config.get("data_format") or "channels_last"
    return dict(
        in_channels=int(in_channels),
        hidden_channels=int(config["filters"]),
        kernel_size=pair("kernel_size", 3),
        num_layers=1,
        stride=pair("strides", 1),
        padding=str(config.get("padding", "valid")).lower(),
        dilation=pair("dilation_rate", 1),
        bias=bool(config.get("use_bias", True)),
        activation=activation("activation", "tanh"),
        recurrent_activation=activation("recurrent_activation", "sigmoid"),
        forget_bias=1.0 if config.get("unit_forget_bias", True) else 0.0,
        dropout=float(config.get("dropout", 0.0)),
        recurrent_dropout=float(config.get("recurrent_dropout", 0.0)),
        go_backwards=bool(config.get("go_backwards", False)),
        data_format=data_format,
        return_sequences=bool(config.get("return_sequences", False)),
        return_state=bool(config.get("return_state", False)),
        stateful=bool(config.get("stateful", False)),
        state_layout="data_format",
    )
