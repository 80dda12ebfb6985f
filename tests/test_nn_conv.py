"""CPU convolution kernel choice (oneDNN or NNPACK): same function whichever runs."""

import pytest
import torch
import torch.nn.functional as F

from nowcast.nn import ConvLSTM2D
from nowcast.nn import conv as conv_backend

nnpack = pytest.mark.skipif(not torch._nnpack_available(), reason="this torch build has no NNPACK")


@pytest.fixture
def policy():
    """Set the backend policy for one test; restore 'auto' afterwards."""
    yield conv_backend.set_cpu_conv_backend
    conv_backend.set_cpu_conv_backend("auto")


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
    for backend in ("native", "nnpack"):
        policy(backend)
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
