"""Tests of ``nowcast.nn.MaxPool3D`` against a naive loop over pooling windows."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nowcast.nn import MaxPool3D


def naive_max_pool(x: torch.Tensor, pool, stride, ceil_mode: bool) -> torch.Tensor:
    """``(B, T, C, H, W)`` -> ``(B, T', C, H', W')``: the max over every window, one by one."""
    sizes = (x.shape[1], x.shape[3], x.shape[4])
    counts = [
        (math.ceil((n - k) / s) if ceil_mode else (n - k) // s) + 1
        for n, k, s in zip(sizes, pool, stride)
    ]
    out = x.new_empty(x.shape[0], counts[0], x.shape[2], counts[1], counts[2])
    for t, i, j in itertools.product(*(range(n) for n in counts)):
        t0, i0, j0 = t * stride[0], i * stride[1], j * stride[2]
        window = x[:, t0 : t0 + pool[0], :, i0 : i0 + pool[1], j0 : j0 + pool[2]]  # clipped at the end
        out[:, t, :, i, j] = window.amax(dim=(1, 3, 4))
    return out


@pytest.mark.parametrize(
    "shape,pool,stride,ceil_mode",
    [
        ((2, 4, 3, 8, 6), (2, 2, 2), None, False),
        ((2, 3, 3, 8, 6), (1, 2, 3), None, False),
        ((1, 5, 2, 7, 7), (2, 3, 3), (1, 2, 2), False),
        ((2, 5, 2, 7, 9), (2, 2, 2), None, True),  # partial windows kept
        ((1, 4, 1, 4, 4), 2, 2, False),  # int pool and stride
    ],
)
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_matches_naive_reference(data_format, shape, pool, stride, ceil_mode) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    layer = MaxPool3D(pool, stride, data_format=data_format, ceil_mode=ceil_mode)
    triple = lambda v: (v,) * 3 if isinstance(v, int) else tuple(v)  # noqa: E731
    want = naive_max_pool(x, triple(pool), triple(stride or pool), ceil_mode)
    if data_format == "channels_last":
        got = layer(x.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
    else:
        got = layer(x)
    assert torch.equal(got, want)
    assert layer.output_size(shape[1], shape[3], shape[4]) == tuple(want.shape[i] for i in (1, 3, 4))


def test_gradient_flows_to_the_max() -> None:
    x = torch.zeros(1, 2, 1, 2, 2, requires_grad=True)
    with torch.no_grad():
        x[0, 1, 0, 0, 1] = 1.0
    MaxPool3D(2)(x).sum().backward()
    assert x.grad.sum() == 1 and x.grad[0, 1, 0, 0, 1] == 1


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"H=7 does not fit pool 2 with stride 2"):
        MaxPool3D(2)(torch.zeros(1, 4, 1, 7, 8))
    with pytest.raises(ValueError, match=r"T=1 is smaller than the pool size 2"):
        MaxPool3D(2)(torch.zeros(1, 1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"expected \(B, T, H, W, C\), got \(1, 4, 8, 8\)"):
        MaxPool3D(2, data_format="channels_last")(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="pool_size must be an int or"):
        MaxPool3D((2, 2))
    with pytest.raises(ValueError, match="data_format"):
        MaxPool3D(2, data_format="NCTHW")
