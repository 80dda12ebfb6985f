"""Training losses that respect a validity mask.

Every loss is called as ``loss(pred, target, mask=None)`` with ``pred`` and ``target``
``(B, T, C, H, W)`` in the network's space and ``mask`` a bool tensor of the same shape
(``True`` = valid). Masked pixels contribute nothing; the mean is over valid pixels only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nowcast.data.transforms import Identity, Transform


def _masked_mean(values: Tensor, mask: Tensor | None, weight: Tensor | None = None) -> Tensor:
    if weight is not None:
        values = values * weight
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {tuple(values.shape)}")
    # where(), not multiply: a NaN under the mask must not leak into the loss.
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1)


class MaskedMSE(nn.Module):
    """Mean squared error over valid pixels."""

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return _masked_mean((pred - target) ** 2, mask)


class MultiScaleLoss(nn.Module):
    """A loss summed over an average-pooling pyramid of forecast and target.

    A forecast that *moves* a frame (``output="motion"``, :class:`~nowcast.models.motion.
    MotionNowcaster`) learns where things go from the loss's gradient with respect to the
    displacement; on full-resolution frames that gradient only sees the one pixel around
    each sample point, so a thin stroke or a rain cell a few pixels off its target feels
    no pull towards it, and erasing it is the cheapest step the loss offers. Pooled copies
    of forecast and target overlap where the full-resolution ones do not, so the coarse
    terms pull the displacement the right way from several pixels out (the coarse-to-fine
    idea of optical-flow estimation) and penalise lost content; the full-resolution term
    keeps the detail.

    Parameters
    ----------
    loss
        The loss applied at every scale, called ``loss(pred, target, mask)``; default
        :class:`MaskedMSE`.
    scales
        Pooling factors, ``1`` being the frames themselves; each must divide ``H`` and
        ``W``. Each term is a mean over its own pixels, so the scales weigh alike.
    weights
        One weight per scale (default all 1).

    With a mask, a pooled pixel is valid where all of its pixels are.
    """

    def __init__(
        self,
        loss: nn.Module | None = None,
        scales: Sequence[int] = (1, 2, 4, 8),
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.loss = loss if loss is not None else MaskedMSE()
        self.scales = [int(s) for s in scales]
        if not self.scales or any(s < 1 for s in self.scales):
            raise ValueError(f"scales must be positive integers, got {list(scales)}")
        self.weights = [1.0] * len(self.scales) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.scales):
            raise ValueError(f"{len(self.weights)} weights for {len(self.scales)} scales")

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        h, w = pred.shape[-2:]
        total = pred.new_zeros((), dtype=torch.float32)
        for scale, weight in zip(self.scales, self.weights):
            if h % scale or w % scale:
                raise ValueError(f"MultiScaleLoss: scale {scale} does not divide the frame size {(h, w)}")
            p, t, m = pred, target, mask
            if scale > 1:
                p, t = (F.avg_pool3d(v, (1, scale, scale)) for v in (pred, target))  # (B, T, C, H/s, W/s)
                if mask is not None:
                    m = -F.max_pool3d(-mask.float(), (1, scale, scale)) > 0.5  # all pixels valid
            total = total + weight * self.loss(p, t, m)
        return total


class MaskedMAE(nn.Module):
    """Mean absolute error over valid pixels."""

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return _masked_mean((pred - target).abs(), mask)


class QuantileLoss(nn.Module):
    """Pinball loss of the ``quantile``-th conditional quantile, over valid pixels.

    ``quantile * e`` for an under-forecast ``e = target - pred > 0``, ``(quantile - 1) * e``
    otherwise; 0.5 is half the MAE (the median). A quantile is unchanged by any increasing
    transform, so the loss may work in log space and still target a quantile of the rain
    rate in mm/h. Why above the median for rain: a forecast of the ``q``-quantile exceeds
    a threshold where the chance of exceeding it is above ``1 - q``, at every threshold at
    once. The median (MAE-optimal) needs a chance above 1/2, but CSI is highest with a
    lower bar (half the best CSI's F1 score, about 0.3-0.45 for nowcasts), so ``q`` a
    little above 0.5 trades some MAE for detecting the uncertain rain that the median
    drops. Measure it: on the BoM day (README), 0.6 on log rain rate let the network
    inflate intensities (validation MAE from ~3 to over 13 mm/h) rather than widen
    rain areas.

    ``transform``: if given, the loss is computed on ``transform.decode`` of both
    (physical units), which weights heavy rain far more than log space does.
    """

    def __init__(self, quantile: float = 0.5, transform: Transform | None = None) -> None:
        super().__init__()
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        self.quantile = float(quantile)
        self.transform = transform

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.transform is not None:  # in physical units
            pred, target = self.transform.decode(pred.float()), self.transform.decode(target.float())
        error = (target - pred).float()
        return _masked_mean(torch.maximum(self.quantile * error, (self.quantile - 1) * error), mask)


class MaskedBCE(nn.Module):
    """Binary cross-entropy for targets in [0, 1] (Moving-MNIST pixel intensities).

    ``pred`` are probabilities (a sigmoid output); they are clamped away from 0 and 1
    so that a saturated pixel gives a large but finite loss.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        # BCE is unsafe under autocast; compute it in float32.
        p = pred.float().clamp(self.eps, 1 - self.eps)
        return _masked_mean(F.binary_cross_entropy(p, target.float(), reduction="none"), mask)


class BalancedMSEMAE(nn.Module):
    """The balanced MSE + MAE of HKO-7 (Shi et al. 2017).

    Each pixel is weighted by the rain rate of its target in physical units: weight
    ``weights[0]`` below ``thresholds[0]``, ``weights[k]`` from ``thresholds[k-1]`` on.
    HKO-7's defaults are weights 1, 1, 2, 5, 10, 30 at 0.5, 2, 5, 10, 30 mm/h: heavy rain,
    rare but what forecasters care about, is not drowned by the dry pixels.

    Parameters
    ----------
    thresholds
        Rain-rate thresholds in the transform's physical units (mm/h), increasing.
    weights
        ``len(thresholds) + 1`` weights.
    mse_weight, mae_weight
        Mix of the two terms (HKO-7 uses 1 and 1).
    transform
        Maps the network's space back to physical units to find each pixel's weight.
    csi_weight, csi_thresholds, csi_temperature
        Optionally add ``csi_weight`` times :class:`SoftCSI` at ``csi_thresholds`` (mm/h),
        which counters the fading of uncertain rain that MSE and MAE reward (0: off).
    """

    def __init__(
        self,
        thresholds: Sequence[float] = (0.5, 2.0, 5.0, 10.0, 30.0),
        weights: Sequence[float] = (1.0, 1.0, 2.0, 5.0, 10.0, 30.0),
        mse_weight: float = 1.0,
        mae_weight: float = 1.0,
        transform: Transform | None = None,
        csi_weight: float = 0.0,
        csi_thresholds: Sequence[float] = (1.0,),
        csi_temperature: float = 0.02,
    ) -> None:
        super().__init__()
        if len(weights) != len(thresholds) + 1:
            raise ValueError(
                f"BalancedMSEMAE needs len(weights) == len(thresholds) + 1, got "
                f"{len(weights)} weights for {len(thresholds)} thresholds"
            )
        if list(thresholds) != sorted(thresholds):
            raise ValueError(f"thresholds must increase, got {list(thresholds)}")
        self.register_buffer("thresholds", torch.tensor(list(thresholds), dtype=torch.float32))
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32))
        self.mse_weight = mse_weight
        self.mae_weight = mae_weight
        self.transform = transform or Identity()
        self.csi_weight = csi_weight
        self.csi = SoftCSI(csi_thresholds, csi_temperature, self.transform) if csi_weight else None

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            physical = self.transform.decode(target.float())
            physical = torch.nan_to_num(physical, nan=0.0)
            # index k such that thresholds[k-1] <= value < thresholds[k]
            weight = self.weights[torch.bucketize(physical, self.thresholds, right=True)]
        diff = (pred - target).float()
        mse = _masked_mean(diff**2, mask, weight)
        mae = _masked_mean(diff.abs(), mask, weight)
        loss = self.mse_weight * mse + self.mae_weight * mae
        if self.csi is not None:
            loss = loss + self.csi_weight * self.csi(pred, target, mask)
        return loss


class PhysicalMAE(nn.Module):
    """Mean absolute error in physical units (``transform.decode``, e.g. mm/h).

    In log space an error of one tenth of a decade costs as much on 0.1 as on 100 mm/h;
    this term holds heavy rain to its observed intensity (the score users read)."""

    def __init__(self, transform: Transform | None = None) -> None:
        super().__init__()
        self.transform = transform or Identity()

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        diff = self.transform.decode(pred.float()) - self.transform.decode(target.float())
        return _masked_mean(diff.abs(), mask)


class SoftCSI(nn.Module):
    """``1 - CSI`` of a smooth rain/no-rain forecast, averaged over thresholds.

    MSE and MAE reward a forecast that spreads thin or fades where the rain's position is
    uncertain (the "double penalty"), which costs CSI. This term scores the events
    directly (Lagerquist & Ebert-Uphoff 2022): a forecast pixel counts as rain with
    probability ``sigmoid((pred - t) / temperature)``, ``t`` the threshold in network
    space; hits, misses and false alarms are summed over the batch's valid pixels.

    Parameters
    ----------
    thresholds
        Rain-rate thresholds in physical units (mm/h), e.g. ``[1.0, 5.0]``.
    temperature
        Width of the sigmoid in network units (for ``LogRainRate(scale=4)``, 0.02 is a
        factor ~1.2 in rain rate).
    transform
        Encodes the thresholds into the network's space.
    """

    def __init__(
        self,
        thresholds: Sequence[float] = (1.0,),
        temperature: float = 0.02,
        transform: Transform | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not thresholds:
            raise ValueError("SoftCSI needs at least one threshold")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        transform = transform or Identity()
        encoded = transform.encode(torch.tensor(list(thresholds), dtype=torch.float32))
        self.register_buffer("thresholds", encoded)
        self.temperature = temperature
        self.eps = eps

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        pred = pred.float()
        target = torch.nan_to_num(target.float(), nan=0.0)
        valid = torch.ones_like(pred) if mask is None else mask.to(pred.dtype)
        losses = []
        for t in self.thresholds:
            p = torch.sigmoid((pred - t) / self.temperature) * valid  # soft "rain forecast"
            o = (target >= t).to(pred.dtype) * valid  # observed rain
            hits = (p * o).sum()
            false_alarms = (p * (1 - o)).sum()
            misses = ((1 - p) * o).sum()
            losses.append(1 - hits / (hits + false_alarms + misses + self.eps))
        return torch.stack(losses).mean()


class LossSum(nn.Module):
    """``sum_k weights[k] * terms[k](pred, target, mask)``, e.g. MSE+MAE plus SoftCSI."""

    def __init__(self, terms: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        weights = [1.0] * len(terms) if weights is None else [float(w) for w in weights]
        if len(weights) != len(terms) or not terms:
            raise ValueError(f"LossSum needs one weight per term, got {len(weights)} for {len(terms)}")
        self.terms = nn.ModuleList(terms)
        self.weights = weights

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return sum(w * term(pred, target, mask) for w, term in zip(self.weights, self.terms))
