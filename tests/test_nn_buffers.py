"""Large CPU buffers kept between training steps, and the convolutions that write into them."""

import pytest
import torch
import torch.nn.functional as F

from nowcast.nn import ConvLSTM2D, backend, buffers
from nowcast.nn import conv as conv_backend

CL = torch.channels_last
onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture(autouse=True)
def fast_paths():
    """These tests are about the pool and the in-place convolutions: switched on also in a
    ``--nn-reference`` session."""
    with backend.override(buffer_pool=True, inplace_add=True, fused=True):
        yield


@pytest.fixture
def pool(monkeypatch):
    """An empty pool that takes every size (the real one only takes >= 16 MiB)."""
    buffers.release()
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)
    yield buffers
    buffers.release()


def test_a_block_is_reused_only_once_nothing_uses_it(pool):
    a = pool.empty((4, 5), torch.float32)
    first = a.data_ptr()
    view = a[1:].t()
    del a
    b = pool.empty((4, 5), torch.float32)  # the view still holds the first block
    assert b.data_ptr() != first
    del view
    c = pool.empty((2, 10), torch.float32)  # same size, other shape
    assert c.data_ptr() == first and c.shape == (2, 10) and c.is_contiguous()
    assert pool.empty((4, 5), torch.float64).data_ptr() not in (first, b.data_ptr())  # other size
    assert pool.cached_bytes() == 2 * 20 * 4 + 20 * 8


def test_best_fit_up_to_twice_the_size(pool):
    big = pool.empty((100,), torch.float32)
    mid = pool.empty((60,), torch.float32)
    ptrs = big.data_ptr(), mid.data_ptr()
    del big, mid
    small = pool.empty((50,), torch.float32)
    assert small.data_ptr() == ptrs[1]  # the smallest that fits
    half = pool.empty((100,), torch.bfloat16)
    assert half.data_ptr() == ptrs[0]  # 200 of 400 bytes
    del half
    assert pool.empty((40,), torch.float32).data_ptr() not in ptrs  # 160 < 400 / 2: new


def test_unused_blocks_are_forgotten_past_max_buffers(pool, monkeypatch):
    monkeypatch.setattr(pool, "MAX_BUFFERS", 3)
    held = [pool.empty((10,), torch.float32) for _ in range(2)]
    pool.empty((100,), torch.float32)  # unused at once
    pool.empty((1000,), torch.float32)  # a 4th block: the unused (100,) one is forgotten
    assert pool.cached_bytes() == (10 + 10 + 1000) * 4
    held += [pool.empty((10_000,), torch.float32), pool.empty((100_000,), torch.float32)]
    # blocks in use are kept whatever their number: their memory is needed anyway
    assert pool.cached_bytes() == (10 + 10 + 10_000 + 100_000) * 4
    del held[1:]
    pool.empty((10,), torch.float32)  # reuses one; the least recent unused are forgotten
    assert pool.cached_bytes() == (10 + 10 + 100_000) * 4
    pool.release()
    assert pool.cached_bytes() == 0
    assert held[0].sum() == held[0].sum()  # a forgotten block stays valid while in use


def test_small_tensors_bypass_the_pool():
    buffers.release()
    small = buffers.empty((8,), torch.float32)
    assert small.shape == (8,) and buffers.cached_bytes() == 0


@onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels", [1, 6])
def test_conv2d_into_a_pool_block_matches_torch(pool, bias, channels):
    torch.manual_seed(0)
    x = torch.randn(3, channels, 9, 11).to(memory_format=CL).requires_grad_()
    w = torch.randn(8, channels, 3, 3, requires_grad=True)
    b = torch.randn(8, requires_grad=True) if bias else None
    out = conv_backend.conv2d(x, w, b, (1, 1))
    assert out.grad_fn.name().endswith("_ConvIntoBufferBackward")
    assert out.is_contiguous(memory_format=CL) and pool.cached_bytes() > 0
    ref = F.conv2d(x, w, b, padding=1)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    inputs = (x, w) if b is None else (x, w, b)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(got, want)


@onednn
def test_conv2d_keeps_torch_outside_channels_last_float(pool):
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(8, 4, 3, 3)
    for inp, weight in [(x, w), (x.double().to(memory_format=CL), w.double())]:
        out = conv_backend.conv2d(inp, weight, None, (1, 1))  # NCHW float32 may run NNPACK:
        torch.testing.assert_close(out, F.conv2d(inp, weight, padding=1), atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_backend.conv2d(x.to(memory_format=CL), w, None, (1, 1))
    assert out.dtype == torch.bfloat16  # as F.conv2d under autocast
    assert pool.cached_bytes() == 0


@pytest.mark.parametrize(
    "dtype, memory_format", [(torch.float32, CL), (torch.bfloat16, CL), (torch.float32, torch.contiguous_format)]
)
def test_conv2d_add_adds_in_place(dtype, memory_format):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 10, 10, dtype=dtype).to(memory_format=memory_format)
    w = torch.randn(12, 6, 3, 3, dtype=dtype) * 0.2
    out = torch.randn(2, 12, 10, 10, dtype=dtype).to(memory_format=memory_format)
    want = out.float() + F.conv2d(x.float(), w.float(), padding=1)
    got = conv_backend.conv2d_add_(out, x, w, (1, 1))
    assert got.data_ptr() == out.data_ptr()
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4  # NCHW float32 may run NNPACK
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def _train_step(model, x, y):
    model.zero_grad(set_to_none=True)
    F.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_training_steps_reuse_blocks_and_compute_the_same(pool):
    torch.manual_seed(0)
    model = ConvLSTM2D(1, [4, 4], 3, memory_format="channels_last")
    x, y = torch.randn(2, 5, 1, 8, 8), torch.randn(2, 5, 4, 8, 8)
    first = _train_step(model, x, y)
    cached = pool.cached_bytes()
    assert cached > 0
    second = _train_step(model, x, y)
    assert pool.cached_bytes() == cached  # every block of the second step was reused
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    pool.release()
    for a, b in zip(first, _train_step(model, x, y)):  # and fresh memory gives the same
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_two_forward_passes_before_one_backward_get_their_own_blocks(pool):
    torch.manual_seed(0)
    model = ConvLSTM2D(1, [4, 4], 3, memory_format="channels_last")
    x1, x2 = torch.randn(2, 5, 1, 8, 8), torch.randn(2, 5, 1, 8, 8)
    out1 = model(x1)
    ref1 = out1.detach().clone()
    out2 = model(x2)
    torch.testing.assert_close(out1.detach(), ref1, rtol=0, atol=0)  # not overwritten
    (out1.square().mean() + out2.mean()).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(x1).square().mean().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model(x2).mean().backward()  # accumulates onto the first
    for g, w in zip(got, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(g, w)
    assert all(not torch.equal(g, w) for g, w in zip(got, want))


def test_retain_graph_backward_twice_doubles_the_gradients(pool):
    torch.manual_seed(0)
    model = ConvLSTM2D(1, [4], 3, memory_format="channels_last")
    loss = model(torch.randn(2, 4, 1, 8, 8)).square().mean()
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in model.parameters()]
    loss.backward()
    for g, o in zip([p.grad for p in model.parameters()], once):
        torch.testing.assert_close(g, 2 * o)


def test_run_leaves_the_callers_gates_alone_unless_consumed():
    torch.manual_seed(0)
    cell = ConvLSTM2D(3, 4, 3, memory_format="channels_last").cells[0]
    x_gates = torch.randn(5, 2, 8, 8, 16).permute(0, 1, 4, 2, 3)  # (T, B, 4Ch, H, W), channels_last frames
    state = cell.init_state(x_gates[0])
    kept = x_gates.clone()
    with torch.no_grad():
        hs, _ = cell.run(x_gates, state, zero_state=True)
        assert torch.equal(x_gates, kept)
        hs2, _ = cell.run(x_gates, state, zero_state=True, consume=True)
    torch.testing.assert_close(hs2, hs)  # the convolution added in place: rounding only


def test_the_flop_counter_counts_the_in_place_convolution():
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 8, 16, 16).to(memory_format=CL)
    w = torch.randn(16, 8, 3, 3)
    out = torch.zeros(2, 16, 16, 16).to(memory_format=CL)
    with FlopCounterMode(display=False) as ours:
        conv_backend.conv2d_add_(out, x, w, (1, 1))
    with FlopCounterMode(display=False) as torchs:
        F.conv2d(x, w, padding=1)
    assert ours.get_total_flops() == torchs.get_total_flops() == 2 * 2 * 16 * 16 * 16 * 8 * 9
