"""Nowcasting baselines: the references a learned model has to beat.

Every baseline is a callable ``baseline(inputs, num_leads) -> preds`` on tensors in
**physical units** (``transform.decode(batch["inputs"])``: mm/h for radar, ``[0, 1]``
for Moving-MNIST): ``inputs`` is ``(B, T_in, C, H, W)``, ``preds`` is
``(B, num_leads, C, H, W)`` on the same device and dtype, and is scored with the same
metrics (:mod:`nowcast.metrics`) as the network.

* ``"persistence"``: :func:`persistence`, the last observed frame, unchanged.
* ``"optical_flow"``: :class:`OpticalFlowExtrapolation`, pysteps' Lucas-Kanade motion
  field + semi-Lagrangian advection of the last frame (needs the ``pysteps`` extra).
* ``"sprog"``: :class:`SProg`, pysteps' S-PROG: the same motion, with each spatial scale
  of the field smoothed as it loses predictability (needs the ``pysteps`` extra).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["BASELINES", "OpticalFlowExtrapolation", "SProg", "get_baseline", "persistence"]

log = logging.getLogger(__name__)

Baseline = Callable[[Tensor, int], Tensor]

_PYSTEPS_MISSING = "optical-flow baseline needs pysteps: pip install 'nowcast[pysteps]'"


def _check_inputs(inputs: Tensor, num_leads: int) -> None:
    if inputs.ndim != 5:
        raise ValueError(f"expected (B, T, C, H, W), got {tuple(inputs.shape)}")
    if num_leads < 1:
        raise ValueError(f"num_leads must be >= 1, got {num_leads}")


def persistence(inputs: Tensor, num_leads: int) -> Tensor:
    """Repeat the last input frame for every lead time (Eulerian persistence).

    Parameters
    ----------
    inputs
        ``(B, T_in, C, H, W)`` past frames, physical units.
    num_leads
        Number of lead times to forecast.

    Returns
    -------
    Tensor
        ``(B, num_leads, C, H, W)``, a copy (not a view) of ``inputs[:, -1]``.
    """
    _check_inputs(inputs, num_leads)
    last = inputs[:, -1:]  # (B, 1, C, H, W)
    return last.expand(-1, num_leads, -1, -1, -1).clone()  # (B, num_leads, C, H, W)


def _decibels(frames: np.ndarray, threshold: float, no_rain: float = -15.0) -> np.ndarray:
    """``10 log10(x)``, with values below ``threshold`` set to ``no_rain`` dB (pysteps' dBR)."""
    rain = frames >= threshold
    return np.where(rain, 10 * np.log10(np.where(rain, frames, 1.0)), no_rain)


def _import_pysteps() -> tuple[Any, Any]:
    """Import pysteps' ``motion`` and ``extrapolation`` without its import banner."""
    try:
        # pysteps prints "Pysteps configuration file found at: ..." on stdout and may
        # warn about optional dependencies; neither helps here.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pysteps  # noqa: F401
            from pysteps import extrapolation, motion
    except ImportError as err:
        raise ImportError(_PYSTEPS_MISSING) from err
    return motion, extrapolation


class OpticalFlowExtrapolation:
    """Advect the last frame along an optical-flow motion field (pysteps).

    For each sample and channel independently (in numpy float64 on the CPU):

    1. the last ``num_input_frames`` frames go through ``pysteps.motion.get_method(method)``
       (default Lucas-Kanade). As in pysteps' examples, the motion is estimated on
       ``10 log10(x)`` with values below ``rain_threshold`` set to ``-15`` dB (no rain);
       ``db_transform=False`` uses the values with sub-threshold ones set to 0 instead;
    2. the last frame, in physical units, is advected with
       ``pysteps.extrapolation.get_method(extrapolation)`` (semi-Lagrangian backward
       scheme, bilinear interpolation) to lead times ``timestep_ratio * (1, 2, ...)``
       input time steps.

    Pixels advected from outside the domain have no known value: they are set to 0 (no
    rain, as the data contract fills missing inputs), as are NaN inputs. Mask them out of
    the scores if that matters (e.g. a border ``max speed * lead`` pixels wide).

    Parameters
    ----------
    method
        pysteps motion method name (``"LK"``, ``"DARTS"``, ``"proesmans"``, ...).
    extrapolation
        pysteps extrapolation method name (``"semilagrangian"``).
    num_input_frames
        Frames used for the motion field (>= 2 for LK); ``None`` = all given frames.
    timestep_ratio
        Lead-time step divided by the input frame step (1 when both are equal, e.g.
        0.5 for 5-minute leads after 10-minute inputs).
    rain_threshold
        Values below it (data units, mm/h for radar) count as no rain for the motion
        estimation. 0.1 mm/h as in pysteps' examples.
    db_transform
        Estimate the motion on the dB-transformed field (see above).
    motion_kwargs, extrapolation_kwargs
        Extra keyword arguments for the pysteps methods.

    Raises
    ------
    ImportError
        If pysteps is not installed (``pip install 'nowcast[pysteps]'``).
    """

    def __init__(
        self,
        method: str = "LK",
        extrapolation: str = "semilagrangian",
        num_input_frames: int | None = None,
        timestep_ratio: float = 1.0,
        rain_threshold: float = 0.1,
        db_transform: bool = True,
        motion_kwargs: dict[str, Any] | None = None,
        extrapolation_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if num_input_frames is not None and num_input_frames < 2:
            raise ValueError(f"num_input_frames must be >= 2, got {num_input_frames}")
        if timestep_ratio <= 0:
            raise ValueError(f"timestep_ratio must be > 0, got {timestep_ratio}")
        motion, extrap = _import_pysteps()
        self.method = method
        self.extrapolation = extrapolation
        self.num_input_frames = num_input_frames
        self.timestep_ratio = float(timestep_ratio)
        self.rain_threshold = float(rain_threshold)
        self.db_transform = db_transform
        # verbose=False silences LK's progress prints; other methods may not take it.
        default_motion = {"verbose": False} if method.lower() in ("lk", "lucaskanade") else {}
        self.motion_kwargs = default_motion | dict(motion_kwargs or {})
        self.extrapolation_kwargs = dict(extrapolation_kwargs or {})
        self._motion = motion.get_method(method)
        self._extrapolate = extrap.get_method(extrapolation)

    def _motion_field(self, frames: np.ndarray) -> np.ndarray:
        """``(T, H, W)`` physical units -> ``(2, H, W)`` velocity (x, y) in px per step."""
        frames = np.nan_to_num(frames, nan=0.0)
        if self.db_transform:
            field = _decibels(frames, self.rain_threshold)
        else:
            field = np.where(frames >= self.rain_threshold, frames, 0.0)
        return self._motion(field, **self.motion_kwargs)

    def __call__(self, inputs: Tensor, num_leads: int) -> Tensor:
        """Forecast by advection.

        Parameters
        ----------
        inputs
            ``(B, T_in, C, H, W)`` past frames, physical units, ``T_in >= 2``.
        num_leads
            Number of lead times to forecast.

        Returns
        -------
        Tensor
            ``(B, num_leads, C, H, W)``, same device and dtype as ``inputs``; 0 where the
            value was advected from outside the domain.
        """
        _check_inputs(inputs, num_leads)
        if inputs.shape[1] < 2:
            raise ValueError(f"optical flow needs >= 2 input frames, got {inputs.shape[1]}")
        n_in = self.num_input_frames or inputs.shape[1]
        past = inputs[:, -n_in:].detach().to("cpu", torch.float64).numpy()  # (B, n, C, H, W)
        b, _, c, h, w = past.shape
        lead_times = [self.timestep_ratio * (k + 1) for k in range(num_leads)]
        out = np.zeros((b, num_leads, c, h, w))
        for i in range(b):
            for ch in range(c):
                frames = past[i, :, ch]  # (n, H, W)
                velocity = self._motion_field(frames)  # (2, H, W)
                out[i, :, ch] = self._forecast(frames, velocity, lead_times)  # (num_leads, H, W)
        out = np.nan_to_num(out, nan=0.0)
        return torch.from_numpy(out).to(device=inputs.device, dtype=inputs.dtype)

    def _forecast(self, frames: np.ndarray, velocity: np.ndarray, lead_times: list[float]) -> np.ndarray:
        """``(n, H, W)`` past frames (physical units) -> ``(num_leads, H, W)``."""
        last = np.nan_to_num(frames[-1], nan=0.0)  # (H, W)
        return self._extrapolate(last, velocity, lead_times, outval=0.0, **self.extrapolation_kwargs)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(method={self.method!r}, extrapolation="
            f"{self.extrapolation!r}, num_input_frames={self.num_input_frames})"
        )


class SProg(OpticalFlowExtrapolation):
    """S-PROG (Seed 2003): extrapolation that smooths each scale as it loses skill (pysteps).

    The motion field is :class:`OpticalFlowExtrapolation`'s (Lucas-Kanade on the dB
    field by default). The last ``ar_order + 1`` frames, in dB (``10 log10`` of the rain
    rate, ``-15`` dB below ``rain_threshold``), are split into ``n_cascade_levels``
    spatial scales; each scale is advected and evolves by its own AR(``ar_order``) model
    fitted to the inputs, so small, short-lived features fade with lead time while large
    ones persist, and the result gets the last observation's intensity distribution
    back (probability matching). Forecast values below ``rain_threshold`` become 0. A
    field too dry for pysteps' fit (see ``_forecast``) is advected instead. On the BoM
    day (README) it beats plain advection at every lead on CSI and, from 30 min, on MAE.

    Parameters
    ----------
    n_cascade_levels, ar_order
        Of ``pysteps.nowcasts.sprog.forecast`` (6 and 2 as in pysteps); the inputs need
        ``T_in >= ar_order + 1`` frames.
    sprog_kwargs
        Other keyword arguments for ``pysteps.nowcasts.sprog.forecast``
        (``probmatching_method``, ``extrap_kwargs``, ...).
    **optical_flow
        :class:`OpticalFlowExtrapolation` parameters (motion method, ``rain_threshold``,
        ``num_input_frames`` for the motion, ``timestep_ratio``).
    """

    def __init__(
        self,
        n_cascade_levels: int = 6,
        ar_order: int = 2,
        sprog_kwargs: dict[str, Any] | None = None,
        **optical_flow: Any,
    ) -> None:
        super().__init__(**optical_flow)
        if ar_order < 1:
            raise ValueError(f"ar_order must be >= 1, got {ar_order}")
        from pysteps.nowcasts import sprog  # after the quiet import above

        self.n_cascade_levels = int(n_cascade_levels)
        self.ar_order = int(ar_order)
        self.sprog_kwargs = dict(sprog_kwargs or {})
        self._sprog = sprog.forecast

    def __call__(self, inputs: Tensor, num_leads: int) -> Tensor:
        if inputs.ndim == 5 and inputs.shape[1] < self.ar_order + 1:
            raise ValueError(
                f"S-PROG with ar_order={self.ar_order} needs >= {self.ar_order + 1} input "
                f"frames, got {inputs.shape[1]}"
            )
        return super().__call__(inputs, num_leads)

    def _forecast(self, frames: np.ndarray, velocity: np.ndarray, lead_times: list[float]) -> np.ndarray:
        threshold_db = 10 * np.log10(self.rain_threshold)
        past = _decibels(np.nan_to_num(frames[-(self.ar_order + 1):], nan=0.0), self.rain_threshold)
        if not (past[-1] >= threshold_db).any():
            return np.zeros((len(lead_times), *frames.shape[1:]))  # nothing to forecast
        try:
            # pysteps prints a banner and per-step progress on stdout
            with contextlib.redirect_stdout(io.StringIO()), np.errstate(all="ignore"):
                forecast_db = self._sprog(
                    past, velocity, lead_times, precip_thr=threshold_db,
                    n_cascade_levels=self.n_cascade_levels, ar_order=self.ar_order, **self.sprog_kwargs,
                )  # (num_leads, H, W) dB, NaN where advected from outside
        except (ValueError, IndexError) as error:
            # pysteps cannot fit a field with (almost) no rain in some input frame: a
            # cascade level without variance leaves its AR model undefined ("x contains
            # non-finite values", "Singular matrix"), an almost empty last frame breaks
            # its rain-area mask (IndexError). Advect such a field instead.
            log.debug("S-PROG failed (%s: %s); plain advection for this field", type(error).__name__, error)
            return super()._forecast(frames, velocity, lead_times)
        rain = np.nan_to_num(forecast_db, nan=-np.inf) >= threshold_db
        return np.where(rain, 10 ** (np.where(rain, forecast_db, 0.0) / 10), 0.0)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(method={self.method!r}, n_cascade_levels="
            f"{self.n_cascade_levels}, ar_order={self.ar_order})"
        )


#: Baseline name -> factory; ``BASELINES[name](**kwargs)`` gives the callable.
BASELINES: dict[str, Callable[..., Baseline]] = {
    "persistence": lambda: persistence,
    "optical_flow": OpticalFlowExtrapolation,
    "sprog": SProg,
}


def get_baseline(name: str, **kwargs: Any) -> Baseline:
    """Build a baseline by name.

    Parameters
    ----------
    name
        ``"persistence"``, ``"optical_flow"`` or ``"sprog"``.
    **kwargs
        Passed to the baseline's constructor (:class:`OpticalFlowExtrapolation`,
        :class:`SProg`); persistence takes none.

    Returns
    -------
    Callable[[Tensor, int], Tensor]
        ``baseline(inputs (B, T_in, C, H, W), num_leads) -> (B, num_leads, C, H, W)``.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    return BASELINES[name](**kwargs)
