"""A network that learns the correction to an optical-flow nowcast.

Optical-flow extrapolation (pysteps' Lucas-Kanade motion + semi-Lagrangian advection)
is the baseline operational nowcasting systems start from; it already knows where the
rain moves. A network trained on a few hours of radar cannot learn advection that well,
but it can learn what extrapolation misses (growth and decay, the smoothing that lowers
the error at long leads, rain near the edges). :class:`ExtrapolationResidual` forecasts

    output_activation(encode(extrapolation(decode(x))) + net(x))

with the network's last layer initialised to zero, so the untrained model is exactly
the extrapolation and training can only move it where the data says so. The
extrapolation is plain advection or pysteps' S-PROG (``baseline="sprog"``), which also
smooths the scales that lose predictability.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nowcast.baselines import OpticalFlowExtrapolation, _import_pysteps, get_baseline
from nowcast.data.transforms import Identity, Transform
from nowcast.models.encoder_forecaster import make_output_activation


class ExtrapolationResidual(nn.Module):
    """``(B, T_in, C, H, W)`` -> ``(B, T_out, C, H, W)``: optical flow plus a learned change.

    Parameters
    ----------
    net
        The correction network (e.g. :class:`~nowcast.models.EncoderForecaster` with
        ``output_activation="identity"``), mapping network-space inputs to
        ``(B, T_out, C, H, W)``. Its ``head`` convolution, if it has one, is zeroed.
    transform
        The data's normalisation: the extrapolation runs on ``transform.decode(x)``
        (physical units, as pysteps expects) and is encoded back.
    output_activation
        Applied to the sum; ``relu`` keeps log rain rates (and rain) non-negative.
    max_value
        Upper bound of the forecast in physical units (e.g. 300 mm/h), encoded with
        ``transform``: in log space a small error of the correction is a huge rain rate.
    probability_matching
        In evaluation mode (``model.eval()``: validation, test, inference), remap each
        forecast field's wet values to the empirical distribution of the last observed
        frame, keeping their ranks and the dry pixels (pysteps'
        ``nonparam_match_empirical_cdf``, as in its S-PROG and STEPS nowcasts): this
        undoes the fading of intensities that MSE/MAE training causes at long leads.
        Not applied in training (it has no gradient).
    baseline
        The nowcast corrected: ``"optical_flow"`` (:class:`~nowcast.baselines.OpticalFlowExtrapolation`)
        or ``"sprog"`` (:class:`~nowcast.baselines.SProg`, which smooths the scales that
        lose predictability).
    **optical_flow
        Passed to the baseline's constructor (``method``, ``num_input_frames``,
        ``rain_threshold``, S-PROG's ``n_cascade_levels``, ...). Needs the ``pysteps`` extra.

    The extrapolation is computed without gradients, per sample on the CPU in numpy;
    the model therefore neither compiles nor exports as one graph (the inner ``net``
    does).
    """

    def __init__(
        self,
        net: nn.Module,
        transform: Transform | None = None,
        output_activation: str = "relu",
        max_value: float | None = None,
        probability_matching: bool = False,
        baseline: str = "optical_flow",
        **optical_flow: Any,
    ) -> None:
        super().__init__()
        for name in ("input_steps", "output_steps", "in_channels", "out_channels"):
            if not hasattr(net, name):
                raise ValueError(f"net {type(net).__name__} has no attribute {name!r}")
        if net.in_channels != net.out_channels:
            raise ValueError(
                f"the extrapolation forecasts the input channels: net.in_channels "
                f"({net.in_channels}) must equal net.out_channels ({net.out_channels})"
            )
        self.net = net
        self.transform = transform or Identity()
        if baseline not in ("optical_flow", "sprog"):
            raise ValueError(f"baseline must be 'optical_flow' or 'sprog', got {baseline!r}")
        self.extrapolation: OpticalFlowExtrapolation = get_baseline(baseline, **optical_flow)  # type: ignore[assignment]
        self.activation = make_output_activation(output_activation)
        self.probability_matching = probability_matching
        self.max_value = (
            None if max_value is None else float(self.transform.encode(torch.tensor(float(max_value))))
        )
        self.input_steps = net.input_steps
        self.output_steps = net.output_steps
        self.in_channels = net.in_channels
        self.out_channels = net.out_channels
        self.spatial_divisor = getattr(net, "spatial_divisor", 1)
        head = getattr(net, "head", None)
        if isinstance(head, nn.Conv2d):
            nn.init.zeros_(head.weight)
            if head.bias is not None:
                nn.init.zeros_(head.bias)

    @torch.no_grad()
    def extrapolate(self, x: Tensor) -> Tensor:
        """The optical-flow nowcast of network-space inputs, in network space."""
        physical = self.transform.decode(x.float())
        return self.transform.encode(self.extrapolation(physical, self.output_steps)).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T_in, C, H, W)`` -> forecast ``(B, T_out, C, H, W)``, network space."""
        out = self.activation(self.extrapolate(x) + self.net(x))
        if self.max_value is not None:
            out = out.clamp(max=self.max_value)
        if self.probability_matching and not self.training:
            out = self.match_distribution(out, x)
        return out

    @torch.no_grad()
    def match_distribution(self, forecast: Tensor, x: Tensor) -> Tensor:
        """Give every field of ``forecast`` ``(B, T_out, C, H, W)`` the value distribution
        of the last input frame of ``x`` (network space in and out; see
        ``probability_matching``)."""
        match = _import_probability_matching()
        fields = self.transform.decode(forecast.float()).cpu().numpy()  # (B, T, C, H, W)
        last = self.transform.decode(x[:, -1].float()).cpu().numpy()  # (B, C, H, W)
        matched = np.empty_like(fields)
        for b, t, c in np.ndindex(*fields.shape[:3]):
            matched[b, t, c] = match(fields[b, t, c], last[b, c])
        return self.transform.encode(torch.from_numpy(matched).to(forecast.device)).to(forecast.dtype)


def _import_probability_matching():
    _import_pysteps()  # quiet import, clear message if missing
    from pysteps.postprocessing.probmatching import nonparam_match_empirical_cdf

    return nonparam_match_empirical_cdf
