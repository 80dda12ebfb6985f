"""3D max pooling over time and space of ``(B, T, C, H, W)`` sequences."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

_LAYOUTS = {
    "channels_first": "(B, T, C, H, W)",
    "channels_last": "(B, T, H, W, C)",
    "keras_channels_first": "(B, C, T, H, W)",
}


class MaxPool3D(nn.Module):
    """Max pooling over time, height and width of a ``(B, T, C, H, W)`` sequence.

    Parameters
    ----------
    pool_size, stride
        ``(t, h, w)`` or one int; ``stride`` defaults to ``pool_size``.
    data_format
        ``"channels_first"`` ``(B, T, C, H, W)`` (default), ``"channels_last"``
        ``(B, T, H, W, C)``, or ``"keras_channels_first"`` ``(B, C, T, H, W)``, the layout
        of Keras's ``MaxPooling3D(data_format="channels_first")``.
    remainder
        What happens to a size that does not fit the pooling (``(size - pool) % stride``
        not 0): ``"error"`` (default: a ``ValueError`` naming the axis, since a silently
        dropped frame or row is usually a mistake in the model's sizes), ``"drop"``
        (Keras's ``padding="valid"``: the partial window at the end is dropped, floor) or
        ``"keep"`` (the partial window is pooled, ceil).
    ceil_mode
        Same as ``remainder="keep"`` (kept for compatibility).
    """

    def __init__(
        self,
        pool_size: int | Sequence[int] = (2, 2, 2),
        stride: int | Sequence[int] | None = None,
        data_format: Literal["channels_first", "channels_last", "keras_channels_first"] = "channels_first",
        ceil_mode: bool = False,
        remainder: Literal["error", "drop", "keep"] = "error",
    ) -> None:
        super().__init__()
        self.pool_size = _triple(pool_size, "pool_size")
        self.stride = self.pool_size if stride is None else _triple(stride, "stride")
        if data_format not in _LAYOUTS:
            raise ValueError(f"data_format must be one of {sorted(_LAYOUTS)}, got {data_format!r}")
        if remainder not in ("error", "drop", "keep"):
            raise ValueError(f"remainder must be 'error', 'drop' or 'keep', got {remainder!r}")
        self.data_format = data_format
        self.remainder = "keep" if ceil_mode else remainder
        self.ceil_mode = self.remainder == "keep"

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}, stride={self.stride}, remainder={self.remainder!r}"

    def output_size(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """``(T', H', W')`` after pooling, or ``ValueError`` if a size does not fit."""
        out = []
        for name, size, k, s in zip(("T", "H", "W"), (t, h, w), self.pool_size, self.stride):
            if size < k and not self.ceil_mode:
                raise ValueError(f"MaxPool3D: {name}={size} is smaller than the pool size {k}")
            if (size - k) % s and self.remainder == "error":
                raise ValueError(
                    f"MaxPool3D: {name}={size} does not fit pool {k} with stride {s} "
                    f"((size - pool) % stride != 0); use sizes that divide, or "
                    f"remainder='drop' (Keras 'valid', floor) or remainder='keep' (ceil)"
                )
            n = math.ceil((size - k) / s) + 1 if self.ceil_mode else (size - k) // s + 1
            out.append(max(n, 1))
        return tuple(out)  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, C, H, W)`` -> ``(B, T', C, H', W')`` (or the channels_last layouts)."""
        if x.dim() != 5:
            raise ValueError(f"expected {_LAYOUTS[self.data_format]}, got {tuple(x.shape)}")
        if self.data_format == "channels_last":
            x = x.permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)
        elif self.data_format == "channels_first":
            x = x.transpose(1, 2)  # (B, C, T, H, W)
        self.output_size(*x.shape[2:])
        y = F.max_pool3d(x, self.pool_size, self.stride, ceil_mode=self.ceil_mode)  # (B, C, T', H', W')
        if self.data_format == "channels_last":
            return y.permute(0, 2, 3, 4, 1)  # (B, T', H', W', C)
        if self.data_format == "channels_first":
            return y.transpose(1, 2)  # (B, T', C, H', W')
        return y


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} must be an int or (t, h, w), got {value!r}")
    return value  # type: ignore[return-value]
