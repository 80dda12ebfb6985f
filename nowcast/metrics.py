"""Streaming verification scores per lead time, as ``torchmetrics.Metric`` subclasses.

Every metric follows pysteps' verification pattern, *init / accumulate / compute*:

* ``__init__(..., num_leads)`` creates the states: only **sums and counts** of shape
  ``(num_leads,)`` (or ``(n_thresholds, num_leads)``, ...), all registered with
  ``dist_reduce_fx="sum"``, so that summing them over batches, over
  ``merge_state`` calls or over DDP ranks gives exactly the scores of the whole set.
* ``update(preds, target, mask=None)`` takes ``(B, T, C, H, W)`` tensors in **physical
  units** (``transform.decode(...)``: mm/h for radar, ``[0, 1]`` for Moving-MNIST) with
  ``T == num_leads``, and ``mask`` a bool tensor of the same shape (``True`` = valid,
  ``None`` = all valid). Masked pixels are ignored: their values, NaN included, never
  reach a state.
* ``compute()`` returns ``dict[str, Tensor]``: for each score ``"<name>"``, a scalar
  pooled over all leads (total sums / total counts, *not* the mean of the per-lead
  values), and ``"<name>_per_lead"`` of shape ``(num_leads,)`` (0-d when
  ``num_leads == 1``: torchmetrics squeezes one-element results; :func:`flatten_scores`
  handles both).

A score whose denominator is zero (no valid pixel, no observed or forecast event, ...)
is NaN, as in pysteps. Non-finite values at *valid* pixels are not dropped: they
propagate into the continuous scores (so a diverging model shows up) and count as
"no event" in the categorical ones; mask missing data instead.

:func:`flatten_scores` turns a ``compute()`` result into the flat ``{"test/mse": ...,
"test/mse/lead01": ...}`` dict that ``LightningModule.log_dict`` takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

__all__ = [
    "CategoricalScores",
    "ContinuousScores",
    "FractionsSkillScore",
    "ImageScores",
    "flatten_scores",
    "threshold_name",
]

PER_LEAD = "_per_lead"


def threshold_name(threshold: float, units_suffix: str = "mmh") -> str:
    """Name fragment of a threshold: ``0.5, "mmh" -> "0p5mmh"``, ``1, "" -> "1"``."""
    return f"{threshold:g}".replace(".", "p") + units_suffix


def _check_inputs(preds: Tensor, target: Tensor, mask: Tensor | None, num_leads: int) -> None:
    if preds.ndim != 5:
        raise ValueError(f"expected (B, T, C, H, W), got preds of shape {tuple(preds.shape)}")
    if preds.shape != target.shape:
        raise ValueError(
            f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape"
        )
    if preds.shape[1] != num_leads:
        raise ValueError(
            f"metric was built for num_leads={num_leads} lead times, got T={preds.shape[1]}"
        )
    if mask is not None:
        if mask.shape != preds.shape:
            raise ValueError(f"mask {tuple(mask.shape)} does not match {tuple(preds.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")


def _pooled_and_per_lead(name: str, numer: Tensor, denom: Tensor) -> dict[str, Tensor]:
    """``{name: sum(numer) / sum(denom), name_per_lead: numer / denom}``; leads on the last dim."""
    numer, denom = numer.double(), denom.double()
    return {
        name: numer.sum(-1) / denom.sum(-1),
        name + PER_LEAD: numer / denom,
    }


class _PerLeadMetric(Metric):
    """Shared plumbing: ``num_leads`` and input checks. Not a score by itself."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_leads: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_leads < 1:
            raise ValueError(f"num_leads must be >= 1, got {num_leads}")
        self.num_leads = int(num_leads)

    def _zeros(self, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
        return torch.zeros(*shape, self.num_leads, dtype=dtype)

    def _valid(self, preds: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
        _check_inputs(preds, target, mask, self.num_leads)
        if mask is None:
            return torch.ones_like(preds, dtype=torch.bool)
        return mask


class ContinuousScores(_PerLeadMetric):
    """Pixel-wise errors: MSE, MAE, bias (mean error), RMSE, per-frame MSE/MAE.

    Parameters
    ----------
    num_leads
        Number of lead times ``T`` of every ``update``.

    Notes
    -----
    With ``e = preds - target`` over the valid pixels (units: those of the data, e.g.
    mm/h; squared for MSE):

    * ``mse = sum(e^2) / n``, ``mae = sum(|e|) / n``, ``bias = sum(e) / n`` (pysteps'
      ``ME``), ``rmse = sqrt(mse)`` (pooled: the root of the pooled MSE).
    * ``mse_frame`` / ``mae_frame``: the sum of ``e^2`` / ``|e|`` over ``(C, H, W)`` of
      each frame (valid pixels only), averaged over frames: the "per frame" MSE/MAE of
      the Moving-MNIST tables (e.g. ConvLSTM, PredRNN, SimVP). Only frames with at
      least one valid pixel are counted.

    States (float64 sums, int64 counts, shape ``(num_leads,)``): ``sum_sq_err``,
    ``sum_abs_err``, ``sum_err``, ``n_pixels``, ``n_frames``.
    """

    def __init__(self, num_leads: int, **kwargs) -> None:
        super().__init__(num_leads, **kwargs)
        self.add_state("sum_sq_err", self._zeros(), dist_reduce_fx="sum")
        self.add_state("sum_abs_err", self._zeros(), dist_reduce_fx="sum")
        self.add_state("sum_err", self._zeros(), dist_reduce_fx="sum")
        self.add_state("n_pixels", self._zeros(dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("n_frames", self._zeros(dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate a batch.

        Parameters
        ----------
        preds, target
            ``(B, T, C, H, W)`` in physical units.
        mask
            ``(B, T, C, H, W)`` bool, ``True`` = valid; ``None`` = all valid.
        """
        valid = self._valid(preds, target, mask)
        # float64: a test set has ~1e9 pixels, beyond float32's exact range.
        err = torch.where(valid, preds.double() - target.double(), 0.0)  # (B, T, C, H, W)
        dims = (0, 2, 3, 4)
        self.sum_sq_err += (err**2).sum(dims)
        self.sum_abs_err += err.abs().sum(dims)
        self.sum_err += err.sum(dims)
        self.n_pixels += valid.sum(dims)
        self.n_frames += valid.flatten(2).any(-1).sum(0)  # (B, T, C*H*W) -> (T,)

    def compute(self) -> dict[str, Tensor]:
        """Scores in the data's units; NaN for a lead without any valid pixel."""
        out = {}
        out.update(_pooled_and_per_lead("mse", self.sum_sq_err, self.n_pixels))
        out.update(_pooled_and_per_lead("mae", self.sum_abs_err, self.n_pixels))
        out.update(_pooled_and_per_lead("bias", self.sum_err, self.n_pixels))
        out["rmse"] = out["mse"].sqrt()
        out["rmse" + PER_LEAD] = out["mse" + PER_LEAD].sqrt()
        out.update(_pooled_and_per_lead("mse_frame", self.sum_sq_err, self.n_frames))
        out.update(_pooled_and_per_lead("mae_frame", self.sum_abs_err, self.n_frames))
        return out


class CategoricalScores(_PerLeadMetric):
    """Contingency-table scores CSI, POD, FAR, HSS, ETS per threshold and lead time.

    An event is ``value >= threshold`` in both fields (as pysteps' ``fss`` and HKO-7;
    pysteps >= 1.x ``det_cat_fct`` uses ``>``, which differs only for values exactly
    equal to a threshold).

    Parameters
    ----------
    thresholds
        Event thresholds in the data's physical units (mm/h for radar).
    num_leads
        Number of lead times ``T`` of every ``update``.
    units_suffix
        Appended to the threshold in score names: ``csi_1mmh``, ``pod_0p5mmh``;
        with ``""``: ``csi_0p5``.

    Notes
    -----
    With hits ``H``, misses ``M``, false alarms ``F``, correct negatives ``R`` and
    ``N = H + M + F + R`` (the formulas of pysteps' ``det_cat_fct_compute``):

    * ``csi = H / (H + M + F)``, ``pod = H / (H + M)``, ``far = F / (H + F)``
    * ``hss = 2 (H R - F M) / ((H + M)(M + R) + (H + F)(F + R))``
    * ``ets = (H - H_r) / (H + M + F - H_r)`` with ``H_r = (H + M)(H + F) / N``

    All are dimensionless. States: int64 ``hits``, ``misses``, ``false_alarms``,
    ``correct_negatives`` of shape ``(n_thresholds, num_leads)``.
    """

    def __init__(
        self, thresholds: Sequence[float], num_leads: int, units_suffix: str = "mmh", **kwargs
    ) -> None:
        super().__init__(num_leads, **kwargs)
        if len(thresholds) == 0:
            raise ValueError("thresholds must not be empty")
        self.thresholds = [float(t) for t in thresholds]
        self.units_suffix = units_suffix
        n = len(self.thresholds)
        for name in ("hits", "misses", "false_alarms", "correct_negatives"):
            self.add_state(name, self._zeros(n, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate a batch.

        Parameters
        ----------
        preds, target
            ``(B, T, C, H, W)`` in the thresholds' physical units.
        mask
            ``(B, T, C, H, W)`` bool, ``True`` = valid; ``None`` = all valid.
        """
        valid = self._valid(preds, target, mask)
        dims = (0, 2, 3, 4)
        for k, thr in enumerate(self.thresholds):
            pred_yes = preds >= thr  # (B, T, C, H, W)
            obs_yes = target >= thr
            self.hits[k] += (valid & pred_yes & obs_yes).sum(dims)
            self.misses[k] += (valid & ~pred_yes & obs_yes).sum(dims)
            self.false_alarms[k] += (valid & pred_yes & ~obs_yes).sum(dims)
            self.correct_negatives[k] += (valid & ~pred_yes & ~obs_yes).sum(dims)

    @staticmethod
    def _scores(h: Tensor, m: Tensor, f: Tensor, r: Tensor) -> dict[str, Tensor]:
        h, m, f, r = h.double(), m.double(), f.double(), r.double()
        h_random = (h + m) * (h + f) / (h + m + f + r)
        return {
            "csi": h / (h + m + f),
            "pod": h / (h + m),
            "far": f / (h + f),
            "hss": 2 * (h * r - f * m) / ((h + m) * (m + r) + (h + f) * (f + r)),
            "ets": (h - h_random) / (h + m + f - h_random),
        }

    def compute(self) -> dict[str, Tensor]:
        """Scores named ``<score>_<threshold><units_suffix>``; NaN on a zero denominator."""
        tables = (self.hits, self.misses, self.false_alarms, self.correct_negatives)
        per_lead = self._scores(*tables)  # each (n_thresholds, num_leads)
        pooled = self._scores(*(t.sum(-1) for t in tables))  # each (n_thresholds,)
        out = {}
        for k, thr in enumerate(self.thresholds):
            suffix = threshold_name(thr, self.units_suffix)
            for score in per_lead:
                out[f"{score}_{suffix}"] = pooled[score][k]
                out[f"{score}_{suffix}{PER_LEAD}"] = per_lead[score][k]
        return out


def _box_filter(x: Tensor, size: int) -> Tensor:
    """Moving average over ``size x size`` windows, zero outside the field.

    Reproduces ``scipy.ndimage.uniform_filter(x, size, mode="constant", cval=0.0)`` (what
    pysteps' ``fss`` uses) on the last two dims, even sizes included: the window of
    output pixel ``i`` spans input pixels ``i - size // 2 .. i + (size - 1) // 2``.

    Parameters
    ----------
    x
        ``(..., H, W)``, float64 (window sums of a binary field are then exact).
    size
        Window width in pixels, >= 1.

    Returns
    -------
    Tensor
        ``(..., H, W)``, fractions in ``[0, 1]`` for a binary field.
    """
    lo, hi = size // 2, size - 1 - size // 2
    x = F.pad(x, (lo, hi, lo, hi))  # (..., H + size - 1, W + size - 1)
    # Window sums as differences of cumulative sums: O(1) per pixel for any size.
    cs = F.pad(x.cumsum(-1), (1, 0))  # (..., H + size - 1, W + size)
    x = cs[..., size:] - cs[..., :-size]  # (..., H + size - 1, W)
    cs = F.pad(x.cumsum(-2), (0, 0, 1, 0))  # (..., H + size, W)
    x = cs[..., size:, :] - cs[..., :-size, :]  # (..., H, W)
    return x / (size * size)


class FractionsSkillScore(_PerLeadMetric):
    """Fractions skill score (Roberts & Lean 2008), as pysteps' ``fss``.

    For each threshold and scale, both fields are made binary (``value >= threshold``),
    smoothed into event fractions ``Pf``, ``Po`` by a ``scale x scale`` moving average
    and ``FSS = 1 - sum((Pf - Po)^2) / (sum(Pf^2) + sum(Po^2))``, the three sums being
    accumulated over all frames and channels of a lead (each ``(H, W)`` channel is one
    field, as pysteps' 2-D ``fss_accum``).

    Parameters
    ----------
    thresholds
        Event thresholds in the data's physical units (mm/h for radar).
    scales
        Window widths in pixels (>= 1; 1 = pixel-wise, even widths allowed).
    num_leads
        Number of lead times ``T`` of every ``update``.
    units_suffix
        Appended to the threshold in score names: ``fss_1mmh_8px``.

    Notes
    -----
    *Borders*: the moving average treats pixels outside the field as non-events and
    still divides by ``scale**2`` (scipy ``uniform_filter(mode="constant", cval=0.0)``,
    pysteps' choice), so values match pysteps' ``fss`` to rounding when there is no mask.

    *Masks*: a masked pixel is treated like a pixel outside the field: it is set to
    non-event in **both** fields before smoothing and its fractions are left out of the
    sums. Its values therefore never matter. (pysteps sets a NaN to non-event only in
    the field where it occurs and keeps its fractions in the sums.)

    FSS is dimensionless, in ``[0, 1]``; NaN when neither field has an event. States:
    float64 ``sum_fct_sq``, ``sum_fct_obs``, ``sum_obs_sq`` of shape
    ``(n_thresholds, n_scales, num_leads)``.
    """

    def __init__(
        self,
        thresholds: Sequence[float],
        scales: Sequence[int],
        num_leads: int,
        units_suffix: str = "mmh",
        **kwargs,
    ) -> None:
        super().__init__(num_leads, **kwargs)
        if len(thresholds) == 0 or len(scales) == 0:
            raise ValueError("thresholds and scales must not be empty")
        if any(int(s) != s or s < 1 for s in scales):
            raise ValueError(f"scales must be integers >= 1 (pixels), got {list(scales)}")
        self.thresholds = [float(t) for t in thresholds]
        self.scales = [int(s) for s in scales]
        self.units_suffix = units_suffix
        shape = (len(self.thresholds), len(self.scales))
        for name in ("sum_fct_sq", "sum_fct_obs", "sum_obs_sq"):
            self.add_state(name, self._zeros(*shape), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate a batch.

        Parameters
        ----------
        preds, target
            ``(B, T, C, H, W)`` in the thresholds' physical units.
        mask
            ``(B, T, C, H, W)`` bool, ``True`` = valid; ``None`` = all valid.
        """
        valid = self._valid(preds, target, mask)
        dims = (0, 2, 3, 4)
        for i, thr in enumerate(self.thresholds):
            # float64 so that the window sums of the 0/1 fields are exact integers.
            fct = (valid & (preds >= thr)).double()  # (B, T, C, H, W)
            obs = (valid & (target >= thr)).double()
            for j, scale in enumerate(self.scales):
                pf = torch.where(valid, _box_filter(fct, scale), 0.0)  # (B, T, C, H, W)
                po = torch.where(valid, _box_filter(obs, scale), 0.0)
                self.sum_fct_sq[i, j] += (pf**2).sum(dims)
                self.sum_fct_obs[i, j] += (pf * po).sum(dims)
                self.sum_obs_sq[i, j] += (po**2).sum(dims)

    def compute(self) -> dict[str, Tensor]:
        """Scores named ``fss_<threshold><units_suffix>_<scale>px``."""
        ff, fo, oo = self.sum_fct_sq, self.sum_fct_obs, self.sum_obs_sq
        out = {}
        for i, thr in enumerate(self.thresholds):
            for j, scale in enumerate(self.scales):
                name = f"fss_{threshold_name(thr, self.units_suffix)}_{scale}px"
                numer = ff[i, j] - 2 * fo[i, j] + oo[i, j]  # sum((Pf - Po)^2), (num_leads,)
                denom = ff[i, j] + oo[i, j]
                out[name] = 1 - numer.sum() / denom.sum()
                out[name + PER_LEAD] = 1 - numer / denom
        return out


class ImageScores(_PerLeadMetric):
    """Image-quality scores SSIM and PSNR, per frame, averaged over frames.

    Parameters
    ----------
    num_leads
        Number of lead times ``T`` of every ``update``.
    data_range
        Value range of the data (``max - min``), used by both scores: 1.0 for
        Moving-MNIST intensities in ``[0, 1]``.

    Notes
    -----
    * ``ssim``: ``torchmetrics.functional.structural_similarity_index_measure`` of each
      ``(C, H, W)`` frame (Gaussian window 11 px, sigma 1.5), dimensionless.
    * ``psnr``: ``10 log10(data_range^2 / MSE)`` of each frame, in dB (torchmetrics
      ``peak_signal_noise_ratio``); ``inf`` for a frame predicted exactly.

    Both are averaged over frames (per lead, and over all frames for the pooled value).
    They are defined on whole images: **the mask is ignored**. Frames need ``H, W >= 11``.
    States: float64 ``sum_ssim``, ``sum_psnr``, int64 ``n_frames``, shape ``(num_leads,)``.
    """

    def __init__(self, num_leads: int, data_range: float = 1.0, **kwargs) -> None:
        super().__init__(num_leads, **kwargs)
        self.data_range = float(data_range)
        self.add_state("sum_ssim", self._zeros(), dist_reduce_fx="sum")
        self.add_state("sum_psnr", self._zeros(), dist_reduce_fx="sum")
        self.add_state("n_frames", self._zeros(dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate a batch.

        Parameters
        ----------
        preds, target
            ``(B, T, C, H, W)`` in physical units.
        mask
            Checked for shape, otherwise ignored.
        """
        _check_inputs(preds, target, mask, self.num_leads)
        b, t = preds.shape[:2]
        # float32 at least: the SSIM convolutions are not safe in half precision.
        dtype = torch.promote_types(preds.dtype, torch.float32)
        p = preds.to(dtype).flatten(0, 1)  # (B * T, C, H, W)
        y = target.to(dtype).flatten(0, 1)
        ssim = structural_similarity_index_measure(
            p, y, data_range=self.data_range, reduction="none"
        )  # (B * T,)
        psnr = peak_signal_noise_ratio(
            p, y, data_range=self.data_range, reduction="none", dim=(1, 2, 3)
        )  # (B * T,)
        self.sum_ssim += ssim.double().view(b, t).sum(0)
        self.sum_psnr += psnr.double().view(b, t).sum(0)
        self.n_frames += b

    def compute(self) -> dict[str, Tensor]:
        """Frame-averaged ``ssim`` (dimensionless) and ``psnr`` (dB)."""
        out = {}
        out.update(_pooled_and_per_lead("ssim", self.sum_ssim, self.n_frames))
        out.update(_pooled_and_per_lead("psnr", self.sum_psnr, self.n_frames))
        return out


def flatten_scores(
    prefix: str, scores: dict[str, Tensor], lead_names: Sequence[str] | None = None
) -> dict[str, float]:
    """Flatten a ``compute()`` result into loggable scalars.

    Parameters
    ----------
    prefix
        Stage namespace: ``"val"``, ``"test"``.
    scores
        ``{"mse": scalar, "mse_per_lead": (num_leads,), ...}`` from a metric's
        ``compute()`` (several metrics' dicts may be merged first).
    lead_names
        Names of the lead times, e.g. ``["10min", "20min"]``; default ``lead01``,
        ``lead02``, ... (zero-padded to at least two digits).

    Returns
    -------
    dict[str, float]
        ``{"test/mse": v, "test/mse/lead01": v1, ...}``; NaN scores stay NaN.
    """
    out: dict[str, float] = {}
    for name, value in scores.items():
        if not name.endswith(PER_LEAD):
            out[f"{prefix}/{name}"] = float(value)
            continue
        base = name[: -len(PER_LEAD)]
        values = value.reshape(-1).tolist()
        if lead_names is None:
            width = max(2, len(str(len(values))))
            names = [f"lead{k:0{width}d}" for k in range(1, len(values) + 1)]
        elif len(lead_names) != len(values):
            raise ValueError(f"{len(lead_names)} lead_names for {len(values)} leads of {name!r}")
        else:
            names = list(lead_names)
        for lead, v in zip(names, values):
            out[f"{prefix}/{base}/{lead}"] = float(v)
    return out
