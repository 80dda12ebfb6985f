"""``nowcast.nn.ConvLSTM2D`` on a CUDA GPU, checked against the CPU in float64.

Every test here is marked ``cuda`` and skipped where ``torch.cuda.is_available()`` is
false (CI, the development machines); ``scripts/gpu_check.sh`` runs them on a GPU with
``python -m pytest -m cuda``. The CPU float64 run of the same weights is the oracle: the
CPU layer is itself checked against an independent float64 reference in
``tests/test_nn_convlstm.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nowcast.nn import ConvLSTM2D
from tests.test_nn_convlstm import _randomize

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

B, T, H, W = 2, 5, 12, 10  # H != W: catches swapped axes

#: The two recurrence paths of the layer: the default LSTM runs the fused recurrence,
#: peepholes (and other activations) run step-wise autograd.
VARIANTS = {
    "fused": dict(),
    "peephole": dict(peephole=True),
}


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """Full float32 convolutions: cuDNN uses TF32 (10-bit mantissa) by default on Ampere+."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _run(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Outputs, final states, input and parameter gradients of one weighted-sum loss."""
    x = x.clone().requires_grad_()
    y, states = model(x)  # y: (B, T, Ch, H, W)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
    ((y * weights).sum() + states[-1][1].square().sum()).backward()
    return [y, *states[-1], x.grad, *(p.grad for p in model.parameters())]


def _pair(variant: str, **kwargs) -> tuple[nn.Module, nn.Module]:
    """The same randomized two-layer stack on the CPU in float64 and on the GPU."""
    torch.manual_seed(0)
    cpu = _randomize(
        ConvLSTM2D(2, [6, 4], 3, return_state=True, **VARIANTS[variant], **kwargs)
    ).double()
    gpu = ConvLSTM2D(2, [6, 4], 3, return_state=True, **VARIANTS[variant], **kwargs).cuda()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float64_equals_cpu(variant) -> None:
    cpu, gpu = _pair(variant)
    gpu.double()
    x = torch.randn(B, T, 2, H, W, dtype=torch.float64)
    for want, got in zip(_run(cpu, x), _run(gpu, x.cuda()), strict=True):
        assert got.is_cuda
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("memory_format", ["auto", "channels_last", "contiguous"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float32_forward_backward_close_to_cpu_float64(variant, memory_format, no_tf32) -> None:
    cpu, gpu = _pair(variant, memory_format=memory_format)
    x = torch.randn(B, T, 2, H, W, dtype=torch.float64)
    want = _run(cpu, x)
    got = _run(gpu, x.float().cuda())
    assert got[0].dtype == torch.float32
    for a, b in zip(got, want, strict=True):
        # float32 rounding over T steps of two layers: relative to each tensor's scale
        scale = b.abs().max().item()
        torch.testing.assert_close(a.cpu().double(), b, rtol=0, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_autocast_trains(variant) -> None:
    _, gpu = _pair(variant)
    x = torch.randn(B, T, 2, H, W)
    with torch.no_grad():
        want, _ = gpu(x.cuda())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, states = gpu(x.cuda())
        loss = F.mse_loss(y.float(), torch.zeros_like(want))
    loss.backward()
    assert y.dtype == torch.bfloat16  # the convolutions and the recurrence ran in bf16
    # bf16 keeps 8 bits of mantissa: ~4e-3 relative per operation, over T steps
    torch.testing.assert_close(y.float(), want, rtol=0, atol=5e-2)
    for name, p in gpu.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # inference path
        torch.testing.assert_close(gpu(x.cuda())[0].float(), want, rtol=0, atol=5e-2)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_steps_and_inference_match_autograd(variant) -> None:
    _, plain = _pair(variant)
    plain.double()
    torch.manual_seed(0)
    ckpt = ConvLSTM2D(2, [6, 4], 3, return_state=True, checkpoint_steps=2, **VARIANTS[variant]).cuda()
    ckpt.double().load_state_dict(plain.state_dict())
    x = torch.randn(B, T, 2, H, W, dtype=torch.float64, device="cuda")
    want = _run(plain, x)
    for a, b in zip(_run(ckpt, x), want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with torch.no_grad():  # the chunked inference loop
        y, states = plain(x)
    torch.testing.assert_close(y, want[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(states[-1][1], want[2], rtol=0, atol=1e-12)
