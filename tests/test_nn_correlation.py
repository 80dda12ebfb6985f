"""nowcast.nn.correlation: the cost volume against a per-pixel numpy reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nowcast.nn import LocalCorrelation, correlation_displacements, local_correlation


def _reference(current: np.ndarray, previous: np.ndarray, radius: int) -> np.ndarray:
    """The definition, one pixel and one displacement at a time."""
    n, c, h, w = current.shape
    disp = [(dx, dy) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    out = np.zeros((n, len(disp), h, w))
    for k, (dx, dy) in enumerate(disp):
        for y in range(h):
            for x in range(w):
                ys, xs = y - dy, x - dx
                if 0 <= ys < h and 0 <= xs < w:
                    out[:, k, y, x] = (current[:, :, y, x] * previous[:, :, ys, xs]).mean(axis=1)
    return out


def test_local_correlation_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    current = torch.rand(2, 3, 7, 9, generator=g, dtype=torch.float64)
    previous = torch.rand(2, 3, 7, 9, generator=g, dtype=torch.float64)
    out = local_correlation(current, previous, 2)
    assert out.shape == (2, 25, 7, 9)
    np.testing.assert_allclose(out.numpy(), _reference(current.numpy(), previous.numpy(), 2), rtol=1e-12)


@pytest.mark.parametrize("dx, dy", [(3, -2), (-1, 4), (0, 0)])
def test_the_peak_is_the_displacement(dx, dy):
    """A random texture moved by (dx, dy): the channel of that displacement wins in the
    interior (where the moved texture is not cut by the frame's edge)."""
    g = torch.Generator().manual_seed(1)
    previous = torch.rand(1, 1, 32, 32, generator=g)
    current = torch.roll(previous, shifts=(dy, dx), dims=(-2, -1))  # content moves right by dx, down by dy
    corr = local_correlation(current, previous, 4)  # (1, 81, 32, 32)
    best = correlation_displacements(4)[corr[0, :, 8:24, 8:24].mean(dim=(-2, -1)).argmax()]
    assert best.tolist() == [dx, dy]


def test_sequence_layer_pairs_consecutive_frames_and_pools():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 4, 1, 16, 16, generator=g)  # (B, T, C, H, W)
    layer = LocalCorrelation(radius=3, pool=4)
    out = layer(x)
    assert out.shape == (2, 4, 49, 4, 4)
    assert layer.channels == 49
    assert torch.all(out[:, 0] == 0)  # the first frame has no predecessor
    full = local_correlation(x[:, 2], x[:, 1], 3)  # (B, 49, 16, 16)
    torch.testing.assert_close(out[:, 2], F.avg_pool2d(full, 4))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="one shape"):
        local_correlation(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9), 1)
    with pytest.raises(ValueError, match="radius"):
        LocalCorrelation(0)
    with pytest.raises(ValueError, match="divisible by pool 4"):
        LocalCorrelation(1, pool=4)(torch.zeros(1, 2, 1, 8, 10))
    with pytest.raises(ValueError, match=r"expected \(B, T, C, H, W\)"):
        LocalCorrelation(1)(torch.zeros(2, 1, 8, 8))
