"""Local correlation (a cost volume) between two frames: where did each pixel's content go?

A ConvLSTM on patches learns displacements of a few pixels slowly from the frames alone:
the motion is finer than its grid and the loss gives it little direction. The cost
volume of FlowNet-C / PWC-Net / RAFT hands it the motion as an input: for every pixel
and every candidate displacement ``d`` in a ``(2r+1) x (2r+1)`` window, the product of
the current frame with the previous one shifted by ``d``. The channel with the largest
value is the displacement that best explains the change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COSTS = ("product", "sqdiff")


def _check_cost(cost: str) -> None:
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")


def correlation_displacements(radius: int) -> Tensor:
    """The ``((2r+1)**2, 2)`` displacements ``(dx, dy)`` in pixels, in the order of the
    channels of :func:`local_correlation` (``dy`` outer, ``dx`` inner, each from ``-r``)."""
    d = torch.arange(-radius, radius + 1)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    return torch.stack((dx.flatten(), dy.flatten()), dim=1)


def local_correlation(current: Tensor, previous: Tensor, radius: int, cost: str = "product") -> Tensor:
    """``out[:, k, y, x] = mean_c current[:, c, y, x] * previous[:, c, y - dy_k, x - dx_k]``.

    With ``cost="sqdiff"`` the negative squared difference ``-mean_c (current - previous
    moved)**2`` instead: the product favours any displacement that lays bright on bright
    (inside a wide stroke or rain area all of them tie), the squared difference only the
    one that matches the whole pattern, background included.

    Parameters
    ----------
    current, previous
        ``(N, C, H, W)`` frames; content moving by ``(dx, dy)`` pixels from ``previous``
        to ``current`` gives its peak in channel ``k`` with displacement ``(dx, dy)``
        (:func:`correlation_displacements`). Outside the frame ``previous`` is zero.
    radius
        Largest displacement in pixels along each axis.
    cost
        ``"product"`` (FlowNet-C's correlation) or ``"sqdiff"`` (block matching).

    Returns
    -------
    Tensor
        ``(N, (2r+1)**2, H, W)``.
    """
    if current.dim() != 4 or current.shape != previous.shape:
        raise ValueError(
            f"expected two (N, C, H, W) frames of one shape, got {tuple(current.shape)} "
            f"and {tuple(previous.shape)}"
        )
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    _check_cost(cost)
    h, w = current.shape[-2:]
    r = radius
    padded = F.pad(previous, (r, r, r, r))  # (N, C, H+2r, W+2r), zeros outside
    out = []
    for dx, dy in correlation_displacements(r).tolist():
        # padded[r - dy + y, r - dx + x] = previous[y - dy, x - dx]
        shifted = padded[..., r - dy : r - dy + h, r - dx : r - dx + w]  # (N, C, H, W)
        if cost == "product":
            out.append((current * shifted).mean(dim=1))  # (N, H, W)
        else:
            out.append(-(current - shifted).square().mean(dim=1))  # (N, H, W)
    return torch.stack(out, dim=1)  # (N, K, H, W)


class LocalCorrelation(nn.Module):
    """The cost volume of consecutive frames of a sequence, on a grid of ``pool`` pixels.

    ``(B, T, C, H, W)`` -> ``(B, T, (2r+1)**2, H/pool, W/pool)``: step ``t`` holds
    :func:`local_correlation` of frame ``t`` with frame ``t-1`` (zeros at ``t = 0``,
    which has no predecessor), averaged over ``pool x pool`` pixels so that it lines up
    with a network working on ``pool x pool`` patches. ``cost`` as in
    :func:`local_correlation`. It has no weights.
    """

    def __init__(self, radius: int, pool: int = 1, cost: str = "product") -> None:
        super().__init__()
        if radius < 1:
            raise ValueError(f"radius must be >= 1, got {radius}")
        if pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        self.radius = int(radius)
        self.pool = int(pool)
        self.channels = (2 * self.radius + 1) ** 2
        _check_cost(cost)
        self.cost = cost

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, C, H, W)`` -> ``(B, T, (2r+1)**2, H/pool, W/pool)``."""
        if x.dim() != 5:
            raise ValueError(f"expected (B, T, C, H, W), got {tuple(x.shape)}")
        b, t = x.shape[:2]
        if x.shape[-2] % self.pool or x.shape[-1] % self.pool:
            raise ValueError(f"frame size {tuple(x.shape[-2:])} is not divisible by pool {self.pool}")
        current = x[:, 1:].flatten(0, 1)  # (B*(T-1), C, H, W)
        previous = x[:, :-1].flatten(0, 1)  # (B*(T-1), C, H, W)
        corr = local_correlation(current, previous, self.radius, self.cost)  # (B*(T-1), K, H, W)
        if self.pool > 1:
            corr = F.avg_pool2d(corr, self.pool)  # (B*(T-1), K, H/pool, W/pool)
        corr = corr.unflatten(0, (b, t - 1))  # (B, T-1, K, h, w)
        return torch.cat((corr.new_zeros(b, 1, *corr.shape[2:]), corr), dim=1)  # (B, T, K, h, w)

    def extra_repr(self) -> str:
        return f"radius={self.radius}, pool={self.pool}, cost={self.cost!r}"
