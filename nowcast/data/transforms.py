"""Invertible value transforms between physical units and the network's space.

A datamodule hands the network ``encode(x)``; every reported score is computed on
``decode(y)`` in physical units. The same transform object (built from the data config)
is given to the datamodule and to the LightningModule.
"""

from __future__ import annotations

from torch import Tensor


class Transform:
    """Base class: ``encode`` physical -> network space, ``decode`` the exact inverse."""

    #: Units of the physical (decoded) values, e.g. ``"mm/h"`` or ``"1"``.
    units: str = "1"

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(units={self.units!r})"


class Identity(Transform):
    """No transform: images already in [0, 1] (Moving-MNIST)."""

    def __init__(self, units: str = "1") -> None:
        self.units = units

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, y: Tensor) -> Tensor:
        return y
