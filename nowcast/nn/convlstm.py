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
inside the time loop. The per-step gate math is one fused autograd node
(:class:`_FusedLSTMPointwise`) in eager mode, and plain tensor ops that Inductor fuses
under ``torch.compile`` / ``torch.export``.
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


class _FusedLSTMPointwise(torch.autograd.Function):
    """tanh/sigmoid gate math without peepholes as one autograd node.

    Eager autograd would record ~12 nodes per step, each allocating a full-size
    gradient; this computes the same derivatives in a handful of passes and saves
    only the activated gates, the previous cell state and ``tanh(c_t)``.
    """

    @staticmethod
    def forward(ctx, xg: Tensor, hg: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        gates = xg + hg  # (B, 4*Ch, H, W)
        n = gates.shape[1] // 4
        i, f, g, o = gates.split(n, dim=1)
        torch.sigmoid_(i)
        torch.sigmoid_(f)
        torch.tanh_(g)
        torch.sigmoid_(o)
        c_next = torch.addcmul(f * c, i, g)
        tanh_c = torch.tanh(c_next)
        h_next = o * tanh_c
        ctx.save_for_backward(gates, c, tanh_c)
        return h_next, c_next

    @staticmethod
    def backward(ctx, dh: Tensor, dc_next: Tensor):  # type: ignore[override]
        gates, c, tanh_c = ctx.saved_tensors
        n = gates.shape[1] // 4
        i, f, g, o = gates.split(n, dim=1)
        if dh is None:
            dh = torch.zeros_like(tanh_c)
        # dc = dc_next + dh * o * (1 - tanh_c^2)
        dc = dh * o * (1 - tanh_c * tanh_c)
        if dc_next is not None:
            dc = dc + dc_next
        dgates = torch.empty_like(gates)
        di, df, dg, do = dgates.split(n, dim=1)
        torch.mul(dc * g, i * (1 - i), out=di)
        torch.mul(dc * c, f * (1 - f), out=df)
        torch.mul(dc * i, 1 - g * g, out=dg)
        torch.mul(dh * tanh_c, o * (1 - o), out=do)
        dc_prev = dc * f
        return dgates, dgates, dc_prev


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
        self._fusable = (
            not peephole and activation == "tanh" and recurrent_activation == "sigmoid"
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
        return F.conv2d(x, self.weight_x, self.bias, self.stride, padding, self.dilation)

    def init_state(self, x_gates: Tensor) -> State:
        """Zero ``(h, c)`` matching gate pre-activations ``(B, 4*Ch, H', W')``."""
        b, _, hh, ww = x_gates.shape
        zeros = x_gates.new_zeros(b, self.hidden_channels, hh, ww)
        return zeros, zeros

    def recurrent_step(self, x_gates: Tensor, state: State) -> State:
        """Advance one step given precomputed input gates ``(B, 4*Ch, H', W')``."""
        h, c = state
        h_gates = F.conv2d(h, self.weight_h, None, 1, self._h_padding)  # (B, 4*Ch, H', W')
        if (
            self._fusable
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not torch.jit.is_scripting()
        ):
            return _FusedLSTMPointwise.apply(x_gates, h_gates, c)
        return self._pointwise(x_gates + h_gates, c)

    def _pointwise(self, gates: Tensor, c: Tensor) -> State:
        """Gate math on pre-activations ``(B, 4*Ch, H, W)``; fuses under torch.compile."""
        i, f, g, o = gates.chunk(4, dim=1)  # each (B, Ch, H, W)
        if self.weight_ci is not None:
            i = i + self.weight_ci * c
            f = f + self.weight_cf * c
        i = self.recurrent_activation(i)
        f = self.recurrent_activation(f)
        c_next = f * c + i * self.activation(g)
        if self.weight_co is not None:
            o = o + self.weight_co * c_next
        h_next = self.recurrent_activation(o) * self.activation(c_next)
        return h_next, c_next

    def forward(self, x: Tensor, state: State | None = None) -> State:
        """One step: ``x`` ``(B, C, H, W)`` -> ``(h, c)``, each ``(B, Ch, H', W')``.

        ``state=None`` starts from zeros of the right shape, device and dtype.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected (B, C, H, W) with C={self.in_channels}, got {tuple(x.shape)}"
            )
        x_gates = self.input_conv(x)
        if state is None:
            state = self.init_state(x_gates)
        else:
            _check_state(state, x_gates.shape[0], self.hidden_channels, x_gates.shape[-2:], 0)
        return self.recurrent_step(x_gates, state)


def _check_state(state: State, batch: int, channels: int, size, layer: int) -> None:
    expected = (batch, channels, *size)
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(f"state of layer {layer} must be a pair (h, c), got {type(state).__name__}")
    for name, t in zip("hc", state):
        if tuple(t.shape) != tuple(expected):
            raise ValueError(
                f"initial {name} of layer {layer}: expected shape {expected}, got {tuple(t.shape)}"
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
        ``(H, W)`` of the states; needed only for full-size peephole weights.
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
    ) -> None:
        super().__init__()
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
        self.cells = nn.ModuleList()
        for layer in range(n):
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
                    frame_size=frame_size,
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

    def _check_input(self, x: Tensor) -> Tensor:
        if self.data_format == "channels_last":
            if x.dim() != 5 or x.shape[-1] != self.in_channels:
                raise ValueError(
                    f"expected (B, T, H, W, C) with C={self.in_channels}, got {tuple(x.shape)}"
                )
            return x.permute(0, 1, 4, 2, 3)  # (B, T, C, H, W), a view
        if x.dim() != 5 or x.shape[2] != self.in_channels:
            raise ValueError(
                f"expected (B, T, C, H, W) with C={self.in_channels}, got {tuple(x.shape)}"
            )
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
        ``(output, [(h, c), ...])``.
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
        outputs: list[Tensor] = []
        states: list[State] = []
        layer_input = x
        for layer, cell in enumerate(self.cells):
            c_in, hh, ww = layer_input.shape[2:]
            # All input-to-state convolutions of the layer at once, outside the loop.
            x_gates = cell.input_conv(layer_input.reshape(b * t, c_in, hh, ww))  # (B*T, 4Ch, H', W')
            x_gates = x_gates.reshape(b, t, *x_gates.shape[1:])  # (B, T, 4Ch, H', W')
            if initial_state is None:
                state = cell.init_state(x_gates[:, 0])
            else:
                state = tuple(initial_state[layer])  # type: ignore[assignment]
                _check_state(state, b, cell.hidden_channels, x_gates.shape[-2:], layer)
            hs, state = self._run_layer(cell, x_gates, state)
            out = torch.stack(hs, dim=1)  # (B, T, Ch, H', W')
            states.append(state)
            outputs.append(out)
            if self.dropout and self.training and layer < self.num_layers - 1:
                out = F.dropout(out, self.dropout, training=True)
            layer_input = out
        if self.stateful:
            self._state = [(h.detach(), c.detach()) for h, c in states]

        def finish(y: Tensor) -> Tensor:
            return self._to_format(y if self.return_sequences else y[:, -1])

        result = [finish(y) for y in outputs] if self.return_all_layers else finish(outputs[-1])
        if self.return_state:
            return result, states
        return result

    def _run_layer(self, cell: ConvLSTMCell, x_gates: Tensor, state: State):
        steps = x_gates.unbind(1)  # unbind, not x[:, t]: its backward is one stack, not T zero-fills
        chunk = self.checkpoint_steps
        if chunk and torch.is_grad_enabled() and self.training:
            hs: list[Tensor] = []
            for start in range(0, len(steps), chunk):
                part = steps[start : start + chunk]
                out = checkpoint(_run_steps, cell, state[0], state[1], *part, use_reentrant=False)
                hs.extend(out[:-1])  # h_1..h_k of the chunk
                state = (out[-2], out[-1])  # (h_k, c_k)
            return hs, state
        hs = []
        for xg in steps:
            state = cell.recurrent_step(xg, state)
            hs.append(state[0])
        return hs, state

    @torch.no_grad()
    def step(self, x_t: Tensor, states: Sequence[State] | None = None) -> tuple[Tensor, list[State]]:
        """Streaming inference: advance every layer by one frame.

        ``x_t`` is ``(B, C, H, W)`` (``(B, H, W, C)`` with ``channels_last``); returns the
        last layer's ``h`` in the same layout and the new ``[(h, c), ...]``.
        """
        if self.data_format == "channels_last":
            x_t = x_t.permute(0, 3, 1, 2)
        new_states: list[State] = []
        inp = x_t
        for layer, cell in enumerate(self.cells):
            state = None if states is None else states[layer]
            h, c = cell(inp, state)
            new_states.append((h, c))
            inp = h
        out = inp.permute(0, 2, 3, 1) if self.data_format == "channels_last" else inp
        return out, new_states

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


def _run_steps(cell: ConvLSTMCell, h: Tensor, c: Tensor, *x_gates: Tensor) -> tuple[Tensor, ...]:
    """Run steps of one chunk; returns ``(h_1, ..., h_k, c_k)`` (checkpoint-friendly)."""
    state = (h, c)
    hs = []
    for xg in x_gates:
        state = cell.recurrent_step(xg, state)
        hs.append(state[0])
    return (*hs, state[1])


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
