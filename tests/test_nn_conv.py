"""CPU convolution kernel choice (oneDNN or NNPACK): same function whichever runs."""

import pytest
import torch
import torch.nn.functional as F

from nowcast.nn import ConvLSTM2D, backend
from nowcast.nn import conv as conv_backend

nnpack = pytest.mark.skipif(not torch._nnpack_available(), reason="this torch build has no NNPACK")


@pytest.fixture
def policy():
    """Set the backend policy for one test; restore the session's afterwards."""
    before = conv_backend.get_cpu_conv_backend()
    yield conv_backend.set_cpu_conv_backend
    conv_backend.set_cpu_conv_backend(before)


@nnpack
@pytest.mark.parametrize("backend", ["auto", "native", "nnpack"])
@pytest.mark.parametrize("shape, kernel, pad", [((2, 8, 16, 16), 3, 1), ((3, 5, 12, 20), 5, 2), ((1, 4, 9, 9), 3, 0)])
def test_conv2d_and_input_grad_match_torch(policy, backend, shape, kernel, pad):
    policy(backend)
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(12, shape[1], kernel, kernel, requires_grad=True)
    b = torch.randn(12, requires_grad=True)
    out = conv_backend.conv2d(x, w, b, (pad, pad))
    ref = F.conv2d(x, w, b, padding=pad)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)  # Winograd/FFT rounding
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (x, w, b), grad)
    want = torch.autograd.grad(ref, (x, w, b), grad)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    dx = conv_backend.conv2d_input_grad(grad, x.detach(), w.detach(), (pad, pad))
    torch.testing.assert_close(dx, want[0], atol=1e-4, rtol=1e-4)


def test_float64_channels_last_and_native_never_use_nnpack(policy, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("NNPACK called")

    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", fail)
    x64, w64 = torch.randn(1, 2, 8, 8, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    policy("nnpack")
    conv_backend.conv2d(x64, w64, None, (1, 1))
    conv_backend.conv2d(x64.float().to(memory_format=torch.channels_last), w64.float(), None, (1, 1))
    policy("native")
    conv_backend.conv2d(x64.float(), w64.float(), None, (1, 1))


@nnpack
def test_convlstm_layer_same_on_either_kernel(policy, monkeypatch):
    calls = []
    real = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    layer = ConvLSTM2D(2, [8, 6], [5, 3], memory_format="contiguous")  # NNPACK reads NCHW only
    x = torch.randn(2, 4, 2, 16, 16)
    outs, grads = [], []
    for name in ("native", "nnpack"):
        policy(name)
        y = layer(x)
        outs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), list(layer.parameters())))
    assert calls  # the second pass really ran on NNPACK
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-4, rtol=1e-3)


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="must be one of"):
        conv_backend.set_cpu_conv_backend("fast")


def test_fastest_memory_format_is_channels_last_where_nnpack_cannot_run(policy):
    policy("auto")  # forget earlier tests' choices
    shape, w, pad = (2, 4, 8, 8), torch.randn(16, 4, 3, 3), (1, 1)
    assert conv_backend.fastest_memory_format(shape, w.double(), pad) == torch.channels_last
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv_backend.fastest_memory_format(shape, w, pad) == torch.channels_last
    policy("native")
    assert conv_backend.fastest_memory_format(shape, w, pad) == torch.channels_last
    policy("auto")
    torch.use_deterministic_algorithms(True)
    try:
        assert conv_backend.fastest_memory_format(shape, w, pad) == torch.channels_last
    finally:
        torch.use_deterministic_algorithms(False)
    assert not conv_backend._layouts  # none of these was timed


@nnpack
def test_fastest_memory_format_times_each_shape_once(policy, monkeypatch):
    policy("auto")  # forget earlier tests' choices
    shape, w, pad = (2, 4, 8, 8), torch.randn(16, 4, 5, 5), (2, 2)
    with backend.override(benchmark=True):
        first = conv_backend.fastest_memory_format(shape, w, pad)
        assert first in (torch.channels_last, torch.contiguous_format)
        monkeypatch.setattr(conv_backend, "conv2d", lambda *a: pytest.fail("timed again"))
        assert conv_backend.fastest_memory_format(shape, w, pad) == first
    assert len(conv_backend._layouts) == 1


@nnpack
@pytest.mark.parametrize("first", [torch.channels_last, torch.contiguous_format])
def test_auto_layer_runs_each_layer_in_its_chosen_format(policy, first):
    policy("auto")  # forget earlier tests' choices
    torch.manual_seed(0)
    auto = ConvLSTM2D(1, [8, 6], [5, 3], return_all_layers=True, return_state=True)
    fixed = ConvLSTM2D(1, [8, 6], [5, 3], return_all_layers=True, memory_format="channels_last")
    fixed.load_state_dict(auto.state_dict())
    x = torch.randn(2, 3, 1, 10, 12)
    # Decide the layouts instead of timing them: layer 0 `first`, layer 1 the other one.
    second = torch.contiguous_format if first == torch.channels_last else torch.channels_last
    frames = [(1, 10, 12), (8, 10, 12)]  # each layer's input frame (C, H, W)
    for cell, frame, fmt in zip(auto.cells, frames, (first, second)):
        key = ((cell.hidden_channels, 10, 12), tuple(cell.weight_h.shape), cell._h_padding,
               torch.get_num_threads(), frame)
        conv_backend._layouts[key] = fmt
    outs, states = auto(x)
    assert len(conv_backend._layouts) == 2  # nothing else was timed
    for (h, c), fmt in zip(states, (first, second)):
        assert h.is_contiguous(memory_format=fmt) and c.is_contiguous(memory_format=fmt)
    for y, want in zip(outs, fixed(x)):
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)  # NNPACK may run in NCHW


@nnpack
@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad, torch.enable_grad])
def test_auto_layer_times_a_layer_once_for_every_batch_size(policy, mode):
    policy("auto")
    layer = ConvLSTM2D(1, 4, 3)
    with backend.override(benchmark=True):
        with mode():  # the first call (which times the layer) may come in any grad mode
            layer(torch.randn(3, 2, 1, 8, 8))
        assert len(conv_backend._layouts) == 1
        layer(torch.randn(2, 2, 1, 8, 8))  # a short last batch: same choice, not timed again
    assert len(conv_backend._layouts) == 1


@nnpack
def test_auto_without_benchmark_follows_the_rule_and_times_nothing(policy, monkeypatch):
    policy("auto")
    monkeypatch.setattr(conv_backend, "_fastest", lambda *a, **k: pytest.fail("timed"))
    # 5x5 over >= 16 channels: NCHW with NNPACK; 3x3: channels_last with oneDNN
    layer = ConvLSTM2D(1, [16, 8], [5, 3], return_state=True)
    _, states = layer(torch.randn(2, 3, 1, 12, 12))
    assert states[0][0].is_contiguous() and not states[0][0].is_contiguous(
        memory_format=torch.channels_last)
    assert states[1][0].is_contiguous(memory_format=torch.channels_last)
    assert not conv_backend._layouts and not conv_backend._choices
    w5, w3 = torch.randn(64, 16, 5, 5), torch.randn(64, 16, 3, 3)
    assert conv_backend._nnpack_rule(w5) and not conv_backend._nnpack_rule(w3)
    assert not conv_backend._nnpack_rule(torch.randn(64, 1, 5, 5))  # few input channels


@nnpack
def test_tune_times_the_shapes_a_model_meets_once(policy):
    policy("auto")
    torch.manual_seed(0)
    layer = ConvLSTM2D(1, [16, 8], [5, 3])
    x = torch.randn(2, 3, 1, 12, 12)
    before = [p.grad for p in layer.parameters()]
    counts = backend.tune(layer, x)
    assert counts["layouts"] == 2 and counts["kernels"] >= 1
    assert [p.grad for p in layer.parameters()] == before  # .grad left alone
    chosen = dict(conv_backend._layouts)
    layer(x).sum().backward()  # runs with the tuned choices, times nothing new
    assert conv_backend._layouts == chosen
