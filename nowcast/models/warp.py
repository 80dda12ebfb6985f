"""Moving a frame along a displacement field (backward warping), for motion outputs.

A network that predicts *where things go* instead of *what the next frame looks like*
keeps the sharpness of the last observation: each forecast frame is the last input
frame sampled at displaced positions. NowcastNet (Zhang et al. 2023, Nature) evolves
radar fields this way; for Moving-MNIST it turns "draw the digit again, shifted" into
"say how far it moved", which a small ConvLSTM learns in a few hundred CPU steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def warp(frame: Tensor, displacement: Tensor, padding_mode: str = "zeros") -> Tensor:
    """Backward warping: ``out[..., y, x] = frame[..., y - dy, x - dx]`` (bilinear).

    Parameters
    ----------
    frame
        ``(B, C, H, W)``, the field to move (e.g. the last observed frame).
    displacement
        ``(B, T, 2, H, W)``, per output pixel how far (pixels, ``(dx, dy)``: x to the
        right, y down) the content arriving there has travelled since ``frame``. One field
        per output time.

    Returns
    -------
    Tensor
        ``(B, T, C, H, W)``: ``frame`` moved by each of the ``T`` fields.
    """
    if frame.dim() != 4 or displacement.dim() != 5 or displacement.shape[2] != 2:
        raise ValueError(
            f"expected frame (B, C, H, W) and displacement (B, T, 2, H, W), got "
            f"{tuple(frame.shape)} and {tuple(displacement.shape)}"
        )
    b, c, h, w = frame.shape
    t = displacement.shape[1]
    if displacement.shape[0] != b or displacement.shape[-2:] != (h, w):
        raise ValueError(
            f"displacement {tuple(displacement.shape)} does not match frame {tuple(frame.shape)}"
        )
    ys = torch.arange(h, device=frame.device, dtype=displacement.dtype)
    xs = torch.arange(w, device=frame.device, dtype=displacement.dtype)
    # Source positions in pixels, then in grid_sample's [-1, 1] (align_corners=True).
    src_x = xs.view(1, 1, 1, w) - displacement[:, :, 0]  # (B, T, H, W)
    src_y = ys.view(1, 1, h, 1) - displacement[:, :, 1]  # (B, T, H, W)
    grid = torch.stack((2 * src_x / max(w - 1, 1) - 1, 2 * src_y / max(h - 1, 1) - 1), dim=-1)
    source = frame.unsqueeze(1).expand(b, t, c, h, w).flatten(0, 1)  # (B*T, C, H, W)
    out = F.grid_sample(source, grid.flatten(0, 1).to(frame.dtype), mode="bilinear",
                        padding_mode=padding_mode, align_corners=True)  # (B*T, C, H, W)
    return out.unflatten(0, (b, t))  # (B, T, C, H, W)


def trajectory(velocity: Tensor, steps: int, padding_mode: str = "border") -> Tensor:
    """Displacements along the backward trajectories of a steady velocity field.

    The semi-Lagrangian scheme of extrapolation nowcasts (Germann and Zawadzki 2002): what
    arrives at ``p`` after ``k`` steps left from ``p - d_k(p)``, with ``d_1 = v(p)`` and
    ``d_k = d_{k-1} + v(p - d_{k-1})`` (the velocity sampled where the trajectory has got
    to, bilinear), so rain follows a curved or converging flow instead of the straight
    line ``k v(p)``. A uniform field gives ``k v``.

    Parameters
    ----------
    velocity
        ``(B, 2, H, W)`` in pixels per step, ``(dx, dy)``.
    steps
        Number of steps.

    Returns
    -------
    Tensor
        ``(B, steps, 2, H, W)``, for :func:`warp`.
    """
    if velocity.dim() != 4 or velocity.shape[1] != 2:
        raise ValueError(f"expected velocity (B, 2, H, W), got {tuple(velocity.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    d = velocity
    out = [d]
    for _ in range(steps - 1):
        d = d + warp(velocity, d[:, None], padding_mode)[:, 0]  # (B, 2, H, W)
        out.append(d)
    return torch.stack(out, dim=1)  # (B, steps, 2, H, W)


def advect(frame: Tensor, weights: Tensor, block: int = 1) -> Tensor:
    """One step of dynamic neural advection (Finn et al. 2016, "DNA"): each output pixel is
    a weighted sum of the input pixels in a ``k x k`` window around it.

    Parameters
    ----------
    frame
        ``(B, C, H, W)``, the field to move.
    weights
        ``(B, k*k, H, W)`` per output pixel, normally a softmax over the window (then mass
        is gathered as a convex combination and a [0, 1] frame stays in [0, 1]). Channel
        ``j`` reads the source pixel at offset ``(oy, ox) = (j // k - r, j % k - r)``
        (``r = (k - 1) / 2``): content moving by ``(dx, dy)`` is weight at ``(-dy, -dx)``.
        Outside the frame the source is zero.
    block
        ``weights`` may be given on a grid ``block`` times coarser, ``(B, k*k, H/block,
        W/block)``: every pixel of a ``block x block`` block then uses its block's window
        weights (a network working on patches; cheaper than upsampling them to pixels).

    Returns
    -------
    Tensor
        ``(B, C, H, W)``.
    """
    if frame.dim() != 4 or weights.dim() != 4:
        raise ValueError(
            f"expected frame (B, C, H, W) and weights (B, k*k, H, W), got "
            f"{tuple(frame.shape)} and {tuple(weights.shape)}"
        )
    b, c, h, w = frame.shape
    k = int(round(weights.shape[1] ** 0.5))
    if (k * k != weights.shape[1] or k % 2 == 0 or weights.shape[0] != b
            or h % block or w % block or weights.shape[-2:] != (h // block, w // block)):
        raise ValueError(
            f"weights {tuple(weights.shape)} must be (B, k*k, H/{block}, W/{block}) with an odd "
            f"k for frame {tuple(frame.shape)}"
        )
    windows = F.unfold(frame, kernel_size=k, padding=k // 2)  # (B, C*k*k, H*W)
    hb, wb = h // block, w // block
    windows = windows.view(b, c, k * k, hb, block, wb, block)  # (B, C, k*k, H/bl, bl, W/bl, bl)
    weights = weights.view(b, 1, k * k, hb, 1, wb, 1)  # broadcast over each block's pixels
    return (windows * weights).sum(dim=2).view(b, c, h, w)  # (B, C, H, W)
