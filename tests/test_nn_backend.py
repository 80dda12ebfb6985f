"""The fast-path seam: settings, capability checks, and each fast path really taken."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from nowcast.nn import ConvLSTM2D, backend, buffers
from nowcast.nn import conv as conv_backend

NNPACK_OP = "aten::_nnpack_spatial_convolution"
ONEDNN_ADD_OP = "mkldnn::_convolution_pointwise_"


def _ops(fn) -> set[str]:
    """Names of the operators ``fn()`` runs (forward and backward)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def _train_step(layer: ConvLSTM2D, x: torch.Tensor):
    def run():
        y = layer(x)
        y.square().sum().backward()
        return y
    return run


@pytest.fixture
def fast():
    """Every fast path on (also in a ``--nn-reference`` session), the pool empty."""
    buffers.release()
    conv_backend.clear_tuning()
    with backend.override(fused=True, cpu_conv="auto", inplace_add=True, buffer_pool=True,
                          benchmark=False):
        yield
    buffers.release()


def test_settings_reject_unknown_names_and_values():
    with pytest.raises(AttributeError, match="no setting 'fuse'.*valid"):
        backend.settings.fuse = False
    with pytest.raises(ValueError, match="cpu_conv must be one of"):
        backend.settings.cpu_conv = "mkl"
    with pytest.raises(ValueError, match="True or False"):
        backend.settings.fused = 1
    before = backend.settings.fused
    with backend.override(fused=not before):
        assert backend.settings.fused is (not before)
    assert backend.settings.fused is before  # restored


def test_this_torch_build_has_every_private_entry_point():
    # The CPU wheel CI installs has all of them; if a release drops one, this test names it
    # (the layers still run: see test_missing_capabilities_fall_back_to_public_ops).
    # oneDNN's bf16 in-place sum needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT.
    from nowcast.nn.cpu import cpu_capabilities

    flags = cpu_capabilities().flags
    bf16 = {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags
    assert backend.capabilities() == backend.Capabilities(True, True, bf16, True)


def test_fused_recurrence_is_taken_for_a_default_layer(fast):
    layer = ConvLSTM2D(2, 4, 3)
    y = layer(torch.randn(2, 3, 2, 8, 8))
    names = []
    node = y.grad_fn
    while node is not None and len(names) < 20:
        names.append(type(node).__name__)
        node = node.next_functions[0][0] if node.next_functions else None
    assert any("_FusedConvLSTMLayer" in n for n in names), names
    with backend.override(fused=False):
        y = layer(torch.randn(2, 3, 2, 8, 8))
    assert "Stack" in type(y.grad_fn).__name__ or "Transpose" in type(y.grad_fn).__name__


def test_nnpack_is_taken_by_the_auto_rule_for_5x5_nchw_layers(fast):
    layer = ConvLSTM2D(16, 16, 5)
    ops = _ops(_train_step(layer, torch.randn(2, 3, 16, 12, 12)))
    assert NNPACK_OP in ops
    ops = _ops(_train_step(ConvLSTM2D(16, 16, 3), torch.randn(2, 3, 16, 12, 12)))
    assert NNPACK_OP not in ops  # 3x3: oneDNN by the rule


def test_onednn_inplace_add_and_pool_are_taken_in_channels_last_training(fast, monkeypatch):
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)
    layer = ConvLSTM2D(4, 8, 3, memory_format="channels_last")
    ops = _ops(_train_step(layer, torch.randn(2, 3, 4, 8, 8)))
    assert ONEDNN_ADD_OP in ops
    assert buffers.cached_bytes() > 0


def test_reference_path_takes_no_fast_path_and_computes_the_same(fast, monkeypatch):
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 10, 10)
    results = {}
    for mode, kernel in (("fast", 5), ("fast", 3), ("reference", 5), ("reference", 3)):
        torch.manual_seed(1)
        layer = ConvLSTM2D(16, [16, 8], kernel)
        buffers.release()
        if mode == "reference":
            with backend.reference():
                ops = _ops(_train_step(layer, x))
                assert buffers.cached_bytes() == 0
            assert not ops & {NNPACK_OP, ONEDNN_ADD_OP}
        else:
            _train_step(layer, x)()
        results[mode, kernel] = (layer(x).detach(), [p.grad for p in layer.parameters()])
    for kernel in (5, 3):
        (y_fast, g_fast), (y_ref, g_ref) = results["fast", kernel], results["reference", kernel]
        torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-4)
        for a, b in zip(g_fast, g_ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_missing_capabilities_fall_back_to_public_ops(fast, monkeypatch):
    """A torch release without the private entry points loses speed, not function."""
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)
    none = backend.Capabilities(nnpack=False, onednn_add=False, onednn_add_bf16=False,
                                storage_use_count=False)
    for module in (backend, conv_backend, buffers):
        monkeypatch.setattr(module, "capabilities", lambda: none)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 10, 10)
    for kernel, fmt in ((5, "auto"), (3, "channels_last")):
        layer = ConvLSTM2D(16, 16, kernel, memory_format=fmt)
        ops = _ops(_train_step(layer, x))
        assert not ops & {NNPACK_OP, ONEDNN_ADD_OP}
        assert buffers.cached_bytes() == 0
        with backend.reference():
            want = layer(x)
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-4)
