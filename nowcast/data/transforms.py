"""Invertible value transforms between physical units and the network's space.

A datamodule hands the network ``encode(x)``; every reported score is computed on
``decode(y)`` in physical units. The same transform object (built from the data config)
is given to the datamodule and to the LightningModule.

Radar transforms take rain rate in mm/h (``units = "mm/h"``) and never decode to
negative rain; ``rain_rate_to_dbz`` / ``dbz_to_rain_rate`` convert with a Z-R relation
``Z = a R^b``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
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


# --------------------------------------------------------------------------------------
# Rain-rate transforms (physical units: mm/h)
# --------------------------------------------------------------------------------------

#: Marshall-Palmer (1948) Z-R relation ``Z = 200 R^1.6`` (Z in mm^6 m^-3, R in mm/h).
MARSHALL_PALMER = (200.0, 1.6)
#: Hong Kong Observatory Z-R relation used by Shi et al. (2015): ``Z = 58.53 R^1.56``.
HKO = (58.53, 1.56)


def rain_rate_to_dbz(rain_rate, a: float = 200.0, b: float = 1.6):
    """Rain rate (mm/h) to reflectivity (dBZ) through ``Z = a R^b``.

    Parameters
    ----------
    rain_rate
        Tensor or ndarray of rain rates in mm/h, any shape. ``R = 0`` gives ``-inf`` dBZ.
    a, b
        Coefficients of the Z-R relation (Marshall-Palmer ``a=200, b=1.6`` by default;
        HKO ``a=58.53, b=1.56``).

    Returns
    -------
    Same type and shape: ``10 log10(a) + 10 b log10(R)`` in dBZ.
    """
    if isinstance(rain_rate, Tensor):
        return 10.0 * math.log10(a) + 10.0 * b * torch.log10(rain_rate)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 10.0 * np.log10(a) + 10.0 * b * np.log10(rain_rate)


def dbz_to_rain_rate(dbz, a: float = 200.0, b: float = 1.6):
    """Reflectivity (dBZ) to rain rate (mm/h) through ``Z = a R^b``: ``R = (10^(dBZ/10) / a)^(1/b)``.

    Parameters
    ----------
    dbz
        Tensor or ndarray of reflectivities in dBZ, any shape (NaN stays NaN).
    a, b
        Coefficients of the Z-R relation.

    Returns
    -------
    Same type and shape, rain rate in mm/h (always >= 0).
    """
    if isinstance(dbz, Tensor):
        return torch.pow(10.0, (dbz - 10.0 * math.log10(a)) / (10.0 * b))
    return np.power(10.0, (np.asarray(dbz) - 10.0 * np.log10(a)) / (10.0 * b))


class LogRainRate(Transform):
    """``y = (log10(R + offset) - log10(offset)) / scale``: mm/h -> ~[0, 1].

    Rain rates span four orders of magnitude (0.1 to ~100 mm/h); the logarithm keeps
    light rain visible to an MSE loss. ``R = 0`` maps to ``y = 0`` exactly, so the
    "no rain" fill of missing inputs is 0 in network space.

    Parameters
    ----------
    offset
        mm/h added before the logarithm; 0.01 mm/h is far below the 0.1 mm/h detection
        limit of radar rainfall products, so it does not blur the rain/no-rain edge.
    scale
        Divisor of the decades above ``offset``; 4 maps 100 mm/h to ~1.0.
    """

    units = "mm/h"

    def __init__(self, offset: float = 0.01, scale: float = 4.0) -> None:
        if offset <= 0 or scale <= 0:
            raise ValueError(f"offset and scale must be > 0, got {offset=}, {scale=}")
        self.offset = float(offset)
        self.scale = float(scale)
        self._log_offset = math.log10(self.offset)

    def encode(self, x: Tensor) -> Tensor:
        """mm/h (negative values clipped to 0) -> network space, same shape."""
        return (torch.log10(x.clamp(min=0.0) + self.offset) - self._log_offset) / self.scale

    def decode(self, y: Tensor) -> Tensor:
        """Network space -> mm/h, same shape; outputs below 0 decode to 0 mm/h."""
        return (torch.pow(10.0, y * self.scale + self._log_offset) - self.offset).clamp(min=0.0)

    def __repr__(self) -> str:
        return f"LogRainRate(offset={self.offset}, scale={self.scale})"


class ScaledRainRate(Transform):
    """``y = R / scale``: linear rain rate, mm/h -> roughly [0, 1].

    Parameters
    ----------
    scale
        mm/h that maps to 1.0; 100 mm/h covers all but the most extreme convection.
    """

    units = "mm/h"

    def __init__(self, scale: float = 100.0) -> None:
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)

    def encode(self, x: Tensor) -> Tensor:
        """mm/h (negative values clipped to 0) -> network space, same shape."""
        return x.clamp(min=0.0) / self.scale

    def decode(self, y: Tensor) -> Tensor:
        """Network space -> mm/h (never negative), same shape."""
        return (y * self.scale).clamp(min=0.0)

    def __repr__(self) -> str:
        return f"ScaledRainRate(scale={self.scale})"


class DBZScaled(Transform):
    """Rain rate -> dBZ through ``Z = a R^b`` -> ``(dBZ - dbz_min) / (dbz_max - dbz_min)``.

    The network sees reflectivity scaled to [0, 1] as in Shi et al. (2015), while the
    physical (decoded) values stay rain rates in mm/h. Reflectivities at or below
    ``dbz_min`` mean "no rain": ``R = 0`` encodes to 0 and 0 decodes to ``R = 0``.
    ``decode(encode(R)) == R`` holds for ``R = 0`` and every ``R >= r_min`` (the rate of
    ``dbz_min``, 0.0087 mm/h with the defaults); trace rain below ``r_min`` becomes 0.

    Parameters
    ----------
    a, b
        Z-R coefficients (Marshall-Palmer by default; HKO: ``a=58.53, b=1.56``).
    dbz_min, dbz_max
        dBZ mapped to 0 and 1. -10 dBZ is below any rain a radar product reports;
        70 dBZ (~ 400 mm/h with Marshall-Palmer) is above any it reports.
    """

    units = "mm/h"

    def __init__(
        self, a: float = 200.0, b: float = 1.6, dbz_min: float = -10.0, dbz_max: float = 70.0
    ) -> None:
        if dbz_max <= dbz_min:
            raise ValueError(f"dbz_max must be > dbz_min, got {dbz_min=}, {dbz_max=}")
        self.a, self.b = float(a), float(b)
        self.dbz_min, self.dbz_max = float(dbz_min), float(dbz_max)
        #: Smallest rain rate (mm/h) that survives a round trip; below it is "no rain".
        self.r_min = float(dbz_to_rain_rate(np.float64(dbz_min), self.a, self.b))

    def encode(self, x: Tensor) -> Tensor:
        """mm/h -> scaled reflectivity in [0, ~1], same shape (R < r_min -> 0)."""
        dbz = rain_rate_to_dbz(x.clamp(min=0.0), self.a, self.b)  # -inf where R = 0
        return (dbz.clamp(min=self.dbz_min) - self.dbz_min) / (self.dbz_max - self.dbz_min)

    def decode(self, y: Tensor) -> Tensor:
        """Scaled reflectivity -> mm/h, same shape; ``y <= 0`` decodes to exactly 0."""
        dbz = y * (self.dbz_max - self.dbz_min) + self.dbz_min
        return torch.where(y > 0, dbz_to_rain_rate(dbz, self.a, self.b), torch.zeros_like(y))

    def __repr__(self) -> str:
        return (
            f"DBZScaled(a={self.a}, b={self.b}, dbz_min={self.dbz_min}, dbz_max={self.dbz_max})"
        )
