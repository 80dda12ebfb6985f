"""Tests of ``nowcast.nn.convlstm``: ConvLSTMCell and ConvLSTM2D.

Correctness is checked against :func:`reference_convlstm`, written here on purpose the
slow, obvious way straight from the gate equations of Shi et al. (2015): one time step
at a time, a separate convolution per gate and per input (x or h), explicit padding,
float64. It shares no code with the layer under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nowcast.nn import ConvLSTM2D, ConvLSTMCell, backend
from nowcast.nn.convlstm import _FusedConvLSTMLayer

torch.set_num_threads(1)  # tiny shapes: threading only adds overhead on a shared box

B, T, H, W = 2, 3, 9, 8  # odd H != W: catches swapped axes and asymmetric "same" padding


# -- the independent reference ---------------------------------------------------------------
def _ref_activation(name) -> callable:
    if callable(name):  # e.g. nn.LeakyReLU(0.2): the slope is the module's
        slope = name.negative_slope
        return lambda x: torch.where(x > 0, x, slope * x)
    return {
        "tanh": lambda x: (torch.exp(x) - torch.exp(-x)) / (torch.exp(x) + torch.exp(-x)),
        "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
        "hard_sigmoid": lambda x: torch.clamp(x / 6 + 0.5, 0, 1),  # Keras 3: relu6(x+3)/6
        "relu": lambda x: torch.clamp(x, min=0),
        "leaky_relu": lambda x: torch.where(x > 0, x, 0.01 * x),
    }[name]


def _tf_same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TensorFlow's documented "SAME" rule; the extra pixel goes to the end."""
    k_eff = (k - 1) * d + 1
    total = max(k_eff - s, 0) if size % s == 0 else max(k_eff - size % s, 0)
    return total // 2, total - total // 2


def _ref_input_conv(x: Tensor, w: Tensor, b: Tensor | None, k, s, p, d) -> Tensor:
    """One gate's input-to-state convolution with explicit padding."""
    if p == "same":
        top, bottom = _tf_same_pads(x.shape[-2], k[0], s[0], d[0])
        left, right = _tf_same_pads(x.shape[-1], k[1], s[1], d[1])
    elif p == "valid":
        top = bottom = left = right = 0
    else:
        top = bottom = left = right = p
    x = F.pad(x, (left, right, top, bottom))
    return F.conv2d(x, w, b, stride=s, dilation=d)


def _ref_recurrent_conv(h: Tensor, w: Tensor) -> Tensor:
    """State-to-state convolution: stride 1, "same" (extra padding at the end)."""
    kh, kw = w.shape[-2:]
    h = F.pad(h, ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2))
    return F.conv2d(h, w)


def reference_convlstm(
    x: Tensor,
    model: ConvLSTM2D,
    convs: list[tuple],
    activation="tanh",
    recurrent_activation="sigmoid",
    initial_state: list[tuple[Tensor, Tensor]] | None = None,
) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """Every layer's output ``(B, T, Ch, H', W')`` and final ``(h, c)``, in float64.

    ``x`` is ``(B, T, C, H, W)``; ``convs`` holds ``(kernel, stride, padding, dilation)``
    per layer as pairs; only the weights are read from ``model``.
    """
    act, sig = _ref_activation(activation), _ref_activation(recurrent_activation)
    inp = x.double()
    outputs, states = [], []
    for layer, (cell, (k, s, p, d)) in enumerate(zip(model.cells, convs)):
        ch = cell.hidden_channels
        wx = cell.weight_x.detach().double().split(ch)  # 4 x (Ch, C, kh, kw): i, f, g, o
        wh = cell.weight_h.detach().double().split(ch)
        bias = cell.bias.detach().double().split(ch) if cell.bias is not None else [None] * 4
        peep = cell.weight_ci is not None
        if peep:
            wci, wcf, wco = (w.detach().double() for w in (cell.weight_ci, cell.weight_cf, cell.weight_co))
        h = c = None
        hs = []
        for t in range(inp.shape[1]):
            xt = inp[:, t]
            pre = [_ref_input_conv(xt, wx[g], bias[g], k, s, p, d) for g in range(4)]
            if h is None:
                if initial_state is None:
                    h = torch.zeros_like(pre[0])
                    c = torch.zeros_like(pre[0])
                else:
                    h, c = (v.double() for v in initial_state[layer])
            pre = [pre[g] + _ref_recurrent_conv(h, wh[g]) for g in range(4)]
            i = sig(pre[0] + (wci * c if peep else 0))
            f = sig(pre[1] + (wcf * c if peep else 0))
            c = f * c + i * act(pre[2])
            o = sig(pre[3] + (wco * c if peep else 0))
            h = o * act(c)
            hs.append(h)
        inp = torch.stack(hs, dim=1)
        outputs.append(inp)
        states.append((h, c))
    return outputs, states


def _pairs(k, s, p, d) -> tuple:
    two = lambda v: tuple(v) if isinstance(v, tuple) else (v, v)  # noqa: E731
    return two(k), two(s), p, two(d)


def _randomize(model: nn.Module) -> nn.Module:
    """Random biases and peepholes too (they start at constants), so every term counts."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "weight_c" in name or "bias" in name:
                p.normal_(0, 0.5)
    return model


# -- equality with the reference over the option grid ------------------------------------------
CONVS = {  # (kernel, stride, padding, dilation) of the first layer
    "k3": (3, 1, "same", 1),
    "stride2": (3, 2, "same", 1),
    "valid": (3, 1, "valid", 1),
    "valid-stride2-dil2": (3, 2, "valid", 2),
    "int-pad": (3, 1, 1, 1),
    "dilation2": (3, 1, "same", 2),
    "rect-kernel-stride": ((3, 5), (2, 1), "same", 1),
    "even-kernel": (2, 1, "same", 1),
    "k5-stride3": (5, 3, "same", 1),
}
ACTIVATIONS = {
    "tanh-sigmoid": ("tanh", "sigmoid"),
    "relu-hard_sigmoid": ("relu", "hard_sigmoid"),
    "leaky0.2-sigmoid": (nn.LeakyReLU(0.2), "sigmoid"),
}


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("activations", list(ACTIVATIONS), ids=str)
@pytest.mark.parametrize("peephole", [False, True], ids=["", "peephole"])
@pytest.mark.parametrize("conv", list(CONVS), ids=str)
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_matches_naive_reference(data_format, conv, peephole, activations, layers) -> None:
    k, s, p, d = CONVS[conv]
    act, rec = ACTIVATIONS[activations]
    # A second layer: its own kernel, so per-layer lists are exercised as well.
    kernels, strides, paddings, dilations = [k, 3], [s, 1], [p, "same"], [d, 1]
    hidden = [3, 2][:layers]
    model = ConvLSTM2D(
        2, hidden, kernels[:layers], stride=strides[:layers], padding=paddings[:layers],
        dilation=dilations[:layers], peephole=peephole, activation=act,
        recurrent_activation=rec, data_format=data_format, return_all_layers=True,
        return_state=True,
    ).double()
    _randomize(model)
    torch.manual_seed(0)
    x = torch.randn(B, T, 2, H, W, dtype=torch.float64)
    convs = [_pairs(*c) for c in zip(kernels, strides, paddings, dilations)][:layers]
    want, want_states = reference_convlstm(x, model, convs, act, rec)
    x_in = x.permute(0, 1, 3, 4, 2) if data_format == "channels_last" else x
    for grad in (True, False):  # the autograd path and the inference path
        with torch.set_grad_enabled(grad):
            got, states = model(x_in.clone().requires_grad_(grad))
        for y, ref in zip(got, want):
            if data_format == "channels_last":
                y = y.permute(0, 1, 4, 2, 3)
            assert y.shape == ref.shape
            torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)
        for (h, c), (rh, rc) in zip(states, want_states):
            torch.testing.assert_close(h, rh, rtol=0, atol=1e-10)
            torch.testing.assert_close(c, rc, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "return_sequences,return_state,return_all_layers",
    list(itertools.product([True, False], repeat=3)),
)
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_return_modes(data_format, return_sequences, return_state, return_all_layers) -> None:
    model = ConvLSTM2D(
        2, [3, 4], 3, data_format=data_format, return_sequences=return_sequences,
        return_state=return_state, return_all_layers=return_all_layers,
    ).double()
    x = torch.randn(B, T, 2, H, W, dtype=torch.float64)
    want, want_states = reference_convlstm(x, model, [_pairs(3, 1, "same", 1)] * 2)
    out = model(x.permute(0, 1, 3, 4, 2) if data_format == "channels_last" else x)
    if return_state:
        out, states = out
        assert len(states) == 2
        for (h, c), (rh, rc) in zip(states, want_states):
            torch.testing.assert_close(h, rh, rtol=0, atol=1e-10)
            torch.testing.assert_close(c, rc, rtol=0, atol=1e-10)
    outs = out if return_all_layers else [out]
    assert isinstance(out, list) == return_all_layers
    for y, ref in zip(outs, want if return_all_layers else want[-1:]):
        ref = ref if return_sequences else ref[:, -1]
        if data_format == "channels_last":
            ref = ref.movedim(-3, -1)
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("memory_format", ["auto", "channels_last", "contiguous"])
def test_initial_state_and_memory_format(memory_format) -> None:
    model = ConvLSTM2D(2, [3, 4], [3, 5], memory_format=memory_format, return_state=True).double()
    _randomize(model)
    x = torch.randn(B, T, 2, H, W, dtype=torch.float64)
    init = [(torch.randn(B, ch, H, W, dtype=torch.float64), torch.randn(B, ch, H, W, dtype=torch.float64)) for ch in (3, 4)]
    want, want_states = reference_convlstm(x, model, [_pairs(3, 1, "same", 1), _pairs(5, 1, "same", 1)], initial_state=init)
    y, states = model(x, initial_state=init)
    torch.testing.assert_close(y, want[-1], rtol=0, atol=1e-10)
    torch.testing.assert_close(states[-1][1], want_states[-1][1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("memory_format", ["channels_last", "contiguous"])
@pytest.mark.parametrize("grad", [True, False])
def test_one_channel_input_runs_every_layer_in_the_memory_format(memory_format, grad) -> None:
    # A (N, 1, H, W) tensor is contiguous in both layouts; the first layer must still run
    # in channels_last when asked (it used to follow the input's NCHW strides).
    model = ConvLSTM2D(1, [4, 3], 3, memory_format=memory_format, return_all_layers=True, return_state=True)
    x = torch.randn(B, T, 1, H, W)
    with torch.set_grad_enabled(grad):
        outs, states = model(x)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    for layer, (y, (h, c)) in enumerate(zip(outs, states)):
        for t in (h, c, y[:, 0], y[:, -1]):
            assert t.is_contiguous(memory_format=fmt), (layer, t.stride())

@pytest.mark.parametrize("mode", ["inference", "checkpointed"])
def test_one_channel_input_chunks_keep_the_first_layer_channels_last(monkeypatch, mode) -> None:
    # Inference and checkpointing run the input convolution per chunk of steps; flattening
    # a chunk gives one-channel frames NCHW strides again, which made the first layer's
    # gates NCHW in those chunks.
    layouts = []
    input_conv = ConvLSTMCell.input_conv

    def spy(self, x):
        out = input_conv(self, x)
        layouts.append(out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous())
        return out

    monkeypatch.setattr(ConvLSTMCell, "input_conv", spy)
    monkeypatch.setattr(backend.settings, "fused", True)  # chunked inference is a fast path
    model = ConvLSTM2D(1, [4, 3], 3, memory_format="channels_last", checkpoint_steps=3)
    x = torch.randn(2, 9, 1, 6, 6)
    if mode == "inference":
        with torch.no_grad():
            model(x)
    else:
        model(x).sum().backward()
    assert len(layouts) >= 6 and all(layouts), layouts


def test_cell_matches_reference() -> None:
    cell = _randomize(ConvLSTMCell(2, 3, 3, stride=2, peephole=False).double())
    layer = ConvLSTM2D(2, 3, 3, stride=2).double()
    layer.cells[0].load_state_dict(cell.state_dict())
    x = torch.randn(B, 1, 2, H, W, dtype=torch.float64)
    want, want_states = reference_convlstm(x, layer, [_pairs(3, 2, "same", 1)])
    h, c = cell(x[:, 0])
    torch.testing.assert_close(h, want_states[0][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(c, want_states[0][1], rtol=0, atol=1e-10)
    # a second step from an explicit state
    h2, c2 = cell(x[:, 0], (h, c))
    want2, _ = reference_convlstm(x.repeat(1, 2, 1, 1, 1), layer, [_pairs(3, 2, "same", 1)])
    torch.testing.assert_close(h2, want2[0][:, 1], rtol=0, atol=1e-10)


def test_full_size_peepholes_per_layer() -> None:
    # frame_size is the input's (H, W); a strided first layer halves the second's state.
    model = ConvLSTM2D(1, [2, 3], 3, stride=[2, 1], peephole=True, frame_size=(H, W)).double()
    assert model.cells[0].weight_ci.shape == (2, math.ceil(H / 2), math.ceil(W / 2))
    assert model.cells[1].weight_ci.shape == (3, math.ceil(H / 2), math.ceil(W / 2))
    _randomize(model)
    x = torch.randn(B, T, 1, H, W, dtype=torch.float64)
    want, _ = reference_convlstm(x, model, [_pairs(3, 2, "same", 1), _pairs(3, 1, "same", 1)])
    torch.testing.assert_close(model(x), want[-1], rtol=0, atol=1e-10)


# -- gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # the fused layer (hand-written BPTT)
        dict(peephole=True),  # step-wise autograd
        dict(stride=2, padding="valid", activation="relu"),
        dict(memory_format="contiguous"),
    ],
    ids=["fused", "peephole", "strided-valid-relu", "nchw"],
)
def test_gradcheck_layer(kwargs) -> None:
    torch.manual_seed(0)
    model = _randomize(ConvLSTM2D(1, [2, 2], 3, return_state=True, **kwargs).double())
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    x = torch.randn(2, 3, 1, 7, 7, dtype=torch.float64, requires_grad=True)
    size = model.output_size(7, 7)
    h0 = torch.randn(2, 2, *size[0], dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, *size[0], dtype=torch.float64, requires_grad=True)

    def fn(x, h0, c0, *ps):
        init = [(h0, c0), (h0.flip(-1), c0.flip(-2))] if size[0] == size[1] else None
        y, states = torch.func.functional_call(model, dict(zip(names, ps)), (x,), {"initial_state": init})
        return y, states[0][1], states[1][0], states[1][1]

    # fast_mode: random directional derivatives of every input and output at once; the
    # fused Function alone gets the full Jacobian check below.
    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params), fast_mode=True)


@pytest.mark.parametrize("outputs", ["both", "hs", "c"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("zero_h0", [False, True])
def test_gradcheck_fused_function(outputs, memory_format, zero_h0) -> None:
    """The hand-written backward of the fused layer, incl. unused outputs (None grads),
    and with ``zero_h0`` (first recurrent convolution and its weight gradient skipped)."""
    torch.manual_seed(0)
    ch = 2
    fmt = lambda t: t.contiguous(memory_format=memory_format).requires_grad_()  # noqa: E731
    x_gates = torch.randn(3, 2, 4 * ch, 4, 5, dtype=torch.float64)
    x_gates = fmt(x_gates.flatten(0, 1)).unflatten(0, (3, 2))  # frames in memory_format
    w = fmt(torch.randn(4 * ch, ch, 3, 3, dtype=torch.float64) * 0.5)
    h0 = fmt(torch.randn(2, ch, 4, 5, dtype=torch.float64))
    if zero_h0:  # a constant zero state: finite differences must not move it
        h0 = torch.zeros_like(h0, requires_grad=False)
    c0 = fmt(torch.randn(2, ch, 4, 5, dtype=torch.float64))

    def fn(*args):
        hs, c = _FusedConvLSTMLayer.apply(*args, (1, 1), zero_h0)
        return {"both": (hs, c), "hs": hs, "c": c}[outputs]

    assert torch.autograd.gradcheck(fn, (x_gates, w, h0, c0))


def test_fused_and_stepwise_paths_agree() -> None:
    """Same outputs and gradients from the fused BPTT and from step-wise autograd."""
    torch.manual_seed(0)
    fused = ConvLSTM2D(2, [3, 4], 3).double()
    plain = ConvLSTM2D(2, [3, 4], 3).double()
    plain.load_state_dict(fused.state_dict())
    for cell in plain.cells:
        cell._fusable = False
    x = torch.randn(B, T, 2, H, W, dtype=torch.float64)
    grads = []
    for model in (fused, plain):
        xx = x.clone().requires_grad_()
        y = model(xx)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads.append([y, xx.grad, *(p.grad for p in model.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


# -- dtypes, compile, export -------------------------------------------------------------------
def test_float32_close_to_float64() -> None:
    model = ConvLSTM2D(2, [3, 4], 3)
    x = torch.randn(B, T, 2, H, W)
    y32 = model(x)
    y64 = model.double()(x.double())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=0, atol=1e-5)


def _autocast_dtypes() -> list[torch.dtype]:
    dtypes = [torch.bfloat16]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            F.conv2d(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1))
        dtypes.append(torch.float16)
    except (RuntimeError, AssertionError):  # pragma: no cover - older CPU builds
        pass
    return dtypes


@pytest.mark.parametrize("dtype", _autocast_dtypes(), ids=str)
@pytest.mark.parametrize("peephole", [False, True], ids=["fused", "peephole"])
def test_autocast(dtype, peephole) -> None:
    torch.manual_seed(0)
    model = ConvLSTM2D(2, [4, 4], 3, peephole=peephole, return_state=True)
    x = torch.randn(B, T, 2, 8, 8)
    want, _ = model(x)
    with torch.autocast("cpu", dtype=dtype):
        y, states = model(x)
        loss = F.mse_loss(y.float(), torch.zeros_like(want))
    loss.backward()
    assert y.dtype == dtype  # the convolutions (and the recurrence) ran in low precision
    torch.testing.assert_close(y.float(), want, rtol=0, atol=5e-2)
    for p in model.parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):  # the inference path too
        torch.testing.assert_close(model(x)[0].float(), want, rtol=0, atol=5e-2)
    # float32 initial states under autocast get float32 gradients
    init = [(torch.zeros(B, 4, 8, 8, requires_grad=True), torch.zeros(B, 4, 8, 8, requires_grad=True)) for _ in range(2)]
    with torch.autocast("cpu", dtype=dtype):
        y, _ = model(x, initial_state=init)
    y.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for pair in init for t in pair)


@pytest.mark.slow
def test_torch_compile() -> None:
    torch.manual_seed(0)
    model = ConvLSTM2D(1, 4, 3)
    x = torch.randn(1, 2, 1, 8, 8)
    compiled = torch.compile(model)
    want = model(x)
    got = compiled(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


def test_export_cell_and_layer() -> None:
    torch.manual_seed(0)
    cell = ConvLSTMCell(2, 3, 3)
    x = torch.randn(B, 2, 8, 8)
    state = (torch.randn(B, 3, 8, 8), torch.randn(B, 3, 8, 8))
    exported = torch.export.export(cell, (x, state))
    for a, b in zip(exported.module()(x, state), cell(x, state)):
        torch.testing.assert_close(a, b)
    layer = ConvLSTM2D(2, [3, 3], 3, peephole=True)
    xs = torch.randn(B, T, 2, 8, 8)
    exported = torch.export.export(layer, (xs,))
    torch.testing.assert_close(exported.module()(xs), layer(xs))


# -- state, streaming, weights, checkpointing ------------------------------------------------------
@pytest.mark.parametrize("peephole", [False, True], ids=["fused", "peephole"])
def test_stateful_halves_equal_one_run(peephole) -> None:
    model = ConvLSTM2D(2, [3, 4], 3, peephole=peephole, stateful=True).double()
    _randomize(model)
    x = torch.randn(B, 4, 2, H, W, dtype=torch.float64)
    whole = model(x)
    model.reset_state()
    first, second = model(x[:, :2]), model(x[:, 2:])
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=0, atol=1e-12)
    model.reset_state()
    torch.testing.assert_close(model(x[:, :2]), first, rtol=0, atol=0)  # reset forgets


def test_step_streaming_equals_forward() -> None:
    model = ConvLSTM2D(2, [3, 4], [3, 5], stride=[2, 1], data_format="channels_last", return_state=True).double()
    x = torch.randn(B, T, H, W, 2, dtype=torch.float64)
    want, want_states = model(x)
    states = None
    for t in range(T):
        y, states = model.step(x[:, t], states)
        torch.testing.assert_close(y, want[:, t], rtol=0, atol=1e-12)
    torch.testing.assert_close(states[-1][1], want_states[-1][1], rtol=0, atol=1e-12)


def test_get_set_weights_round_trip() -> None:
    src = _randomize(ConvLSTM2D(2, [3, 4], [3, (3, 5)], peephole=True))
    weights = src.get_weights()
    assert weights[1]["kernel"].shape == (3, 5, 3, 16)  # Keras (kh, kw, C_in, 4*Ch)
    assert weights[1]["recurrent_kernel"].shape == (3, 5, 4, 16)
    dst = ConvLSTM2D(2, [3, 4], [3, (3, 5)], peephole=True)
    dst.set_weights(weights)
    for a, b in zip(src.parameters(), dst.parameters()):
        assert torch.equal(a, b)
    x = torch.randn(B, T, 2, H, W)
    assert torch.equal(src(x), dst(x))
    with pytest.raises(ValueError, match=r"layer 0 kernel: expected shape \(3, 3, 2, 12\)"):
        bad = [dict(w) for w in weights]
        bad[0]["kernel"] = bad[0]["kernel"][:, :, :1]
        dst.set_weights(bad)


@pytest.mark.parametrize("peephole", [False, True], ids=["fused", "peephole"])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_checkpoint_steps_same_outputs_and_grads(chunk, peephole) -> None:
    torch.manual_seed(0)
    plain = _randomize(ConvLSTM2D(2, [3, 4], 3, peephole=peephole, return_state=True).double())
    ckpt = ConvLSTM2D(2, [3, 4], 3, peephole=peephole, return_state=True, checkpoint_steps=chunk).double()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(B, 4, 2, H, W, dtype=torch.float64)
    results = []
    for model in (plain, ckpt):
        xx = x.clone().requires_grad_()
        y, states = model(xx)
        (y.square().sum() + states[0][1].sum()).backward()
        results.append([y, states[0][1], xx.grad, *(p.grad for p in model.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)



@pytest.mark.parametrize("steps", [3, 4, 7])  # fewer, as many as, more than one inference chunk
@pytest.mark.parametrize("peephole", [False, True], ids=["fused", "peephole"])
def test_inference_equals_autograd_forward(steps, peephole) -> None:
    # Without autograd the input gates are computed a few steps at a time
    # (_INFERENCE_CHUNK = 4); every output and state must be the same as with autograd.
    torch.manual_seed(0)
    model = _randomize(ConvLSTM2D(2, [3, 4], [3, 5], stride=[2, 1], peephole=peephole,
                                  data_format="channels_last", return_state=True,
                                  return_all_layers=True).double())
    x = torch.randn(B, steps, H, W, 2, dtype=torch.float64)
    with torch.no_grad():  # a non-zero initial state, from an earlier sequence
        init = model(torch.randn(B, 2, H, W, 2, dtype=torch.float64))[1]
    want, want_states = model(x, init)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got, got_states = model(x, init)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        for (h, c), (wh, wc) in zip(got_states, want_states):
            torch.testing.assert_close(h, wh, rtol=0, atol=1e-12)
            torch.testing.assert_close(c, wc, rtol=0, atol=1e-12)

# -- init and errors ---------------------------------------------------------------------------
def test_keras_initialization() -> None:
    cell = ConvLSTMCell(3, 8, 3, forget_bias=1.0)
    fan_in, fan_out = 3 * 9, 4 * 8 * 9
    assert cell.weight_x.abs().max() <= math.sqrt(6 / (fan_in + fan_out))  # Glorot uniform
    wh = cell.weight_h.detach().reshape(32, -1)  # (4*Ch, Ch*kh*kw): rows orthonormal
    torch.testing.assert_close(wh @ wh.T, torch.eye(32), rtol=0, atol=1e-5)
    assert torch.equal(cell.bias, torch.cat([torch.zeros(8), torch.ones(8), torch.zeros(16)]))


def test_activation_callable_and_unknown() -> None:
    model = ConvLSTM2D(1, 2, 3, activation=nn.LeakyReLU(0.3)).double()
    x = torch.randn(1, 2, 1, 5, 5, dtype=torch.float64)
    want, _ = reference_convlstm(x, model, [_pairs(3, 1, "same", 1)], nn.LeakyReLU(0.3))
    torch.testing.assert_close(model(x), want[0], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        ConvLSTM2D(1, 2, activation="swishy")


@pytest.mark.parametrize(
    "kwargs,shape,match",
    [
        (dict(), (8, 10, 64, 64), r"expected \(B, T, C, H, W\) with C=1, got \(8, 10, 64, 64\)"),
        (dict(), (2, 3, 2, 8, 8), r"expected \(B, T, C, H, W\) with C=1, got \(2, 3, 2, 8, 8\)"),
        (dict(data_format="channels_last"), (2, 3, 1, 8, 8), r"expected \(B, T, H, W, C\) with C=1"),
    ],
)
def test_bad_input_shapes(kwargs, shape, match) -> None:
    model = ConvLSTM2D(1, 2, 3, **kwargs)
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape))


def test_other_errors() -> None:
    model = ConvLSTM2D(1, [2, 3], 3)
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(1, 2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"initial h of layer 1: expected shape \(1, 3, 8, 8\), got \(1, 2, 8, 8\)"):
        z = torch.zeros(1, 2, 8, 8)
        model(torch.zeros(1, 2, 1, 8, 8), initial_state=[(z, z), (z, z)])
    with pytest.raises(ValueError, match="one \\(h, c\\) per layer"):
        model(torch.zeros(1, 2, 1, 8, 8), initial_state=[(z, z)])
    with pytest.raises(ValueError, match=r"expected \(B, C, H, W\) with C=2"):
        ConvLSTMCell(2, 3)(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="kernel_size has 3 entries but there are 2 layers"):
        ConvLSTM2D(1, [2, 3], [3, 3, 3], num_layers=2)
    with pytest.raises(ValueError, match="disagree on the number of layers"):
        ConvLSTM2D(1, [2, 3], [3, 3, 3])
    with pytest.raises(ValueError, match="memory_format"):
        ConvLSTM2D(1, 2, memory_format="nhwc")
    with pytest.raises(ValueError, match="padding must be"):
        ConvLSTMCell(1, 2, padding="full")


@pytest.mark.parametrize("memory_format", ["auto", "channels_last", "contiguous"])
@pytest.mark.parametrize("kernel_size", [2, (3, 4)])
def test_even_kernel_float32_runs_in_every_memory_format(memory_format, kernel_size) -> None:
    # An even kernel's recurrent padding is the string "same"; the NNPACK eligibility
    # check compared it with 0 and raised TypeError in float32 with the "auto" layout.
    torch.manual_seed(0)
    layer = ConvLSTM2D(3, 4, kernel_size=kernel_size, memory_format=memory_format)
    x = torch.randn(2, 5, 3, 9, 11)
    y = layer(x)
    assert y.shape == (2, 5, 4, 9, 11)
    reference = ConvLSTM2D(3, 4, kernel_size=kernel_size, memory_format="contiguous").double()
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(y.double(), reference(x.double()), rtol=1e-4, atol=1e-5)
    h, states = layer.step(x[:, 0])
    assert h.shape == (2, 4, 9, 11) and states[0][1].shape == (2, 4, 9, 11)
