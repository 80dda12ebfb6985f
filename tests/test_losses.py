"""Masked losses against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from nowcast.data.transforms import Identity
from nowcast.losses import BalancedMSEMAE, MaskedBCE, MaskedMAE, MaskedMSE


def _t(values):
    return torch.tensor(values, dtype=torch.float32).reshape(1, len(values), 1, 1, 1)


def test_masked_mse_mae_by_hand():
    pred, target = _t([1.0, 2.0, 5.0]), _t([0.0, 4.0, 100.0])
    mask = torch.tensor([True, True, False]).reshape(1, 3, 1, 1, 1)
    assert MaskedMSE()(pred, target, mask).item() == pytest.approx((1 + 4) / 2)
    assert MaskedMAE()(pred, target, mask).item() == pytest.approx((1 + 2) / 2)
    assert MaskedMSE()(pred, target).item() == pytest.approx((1 + 4 + 95**2) / 3)


def test_nan_under_mask_does_not_leak():
    pred, target = _t([1.0, 2.0]), _t([0.0, float("nan")])
    mask = torch.tensor([True, False]).reshape(1, 2, 1, 1, 1)
    assert MaskedMSE()(pred, target, mask).item() == pytest.approx(1.0)


def test_mask_shape_mismatch():
    with pytest.raises(ValueError, match="mask shape"):
        MaskedMSE()(_t([1.0, 2.0]), _t([1.0, 2.0]), torch.ones(1, 3, 1, 1, 1, dtype=torch.bool))


def test_bce_matches_definition():
    pred, target = _t([0.9, 0.2]), _t([1.0, 0.0])
    expected = -(math.log(0.9) + math.log(0.8)) / 2
    assert MaskedBCE()(pred, target).item() == pytest.approx(expected, rel=1e-6)
    # saturated predictions stay finite
    assert torch.isfinite(MaskedBCE()(_t([0.0, 1.0]), _t([1.0, 0.0])))


def test_balanced_weights_by_hand():
    # targets (mm/h) in each weight band of HKO-7: <0.5, [0.5,2), [2,5), [5,10), [10,30), >=30
    target = _t([0.1, 1.0, 3.0, 7.0, 20.0, 40.0])
    pred = target + 1.0  # error 1 everywhere: the loss is the mean weight, twice
    loss = BalancedMSEMAE(transform=Identity())(pred, target)
    weights = [1, 1, 2, 5, 10, 30]
    assert loss.item() == pytest.approx(2 * sum(weights) / 6)
    # boundary: exactly 2 mm/h belongs to the band starting at 2 (weight 2)
    at = _t([2.0])
    assert BalancedMSEMAE()(at + 1, at).item() == pytest.approx(4.0)


def test_balanced_argument_errors():
    with pytest.raises(ValueError, match="len\\(weights\\) == len\\(thresholds\\) \\+ 1"):
        BalancedMSEMAE(thresholds=[1, 2], weights=[1, 2])
    with pytest.raises(ValueError, match="thresholds must increase"):
        BalancedMSEMAE(thresholds=[2, 1], weights=[1, 2, 3])


def test_soft_csi_scores_events_and_respects_the_mask():
    from nowcast.data.transforms import LogRainRate
    from nowcast.losses import SoftCSI

    transform = LogRainRate()
    loss = SoftCSI([1.0], temperature=1e-4, transform=transform)  # ~hard threshold
    rain = torch.tensor([0.0, 5.0, 5.0, 0.0]).view(1, 1, 1, 2, 2)
    target = transform.encode(rain)
    assert loss(target, target).item() == pytest.approx(0.0, abs=1e-4)
    # one hit, one miss, one false alarm: CSI = 1/3
    forecast = transform.encode(torch.tensor([5.0, 5.0, 0.0, 0.0]).view(1, 1, 1, 2, 2))
    assert loss(forecast, target).item() == pytest.approx(2 / 3, abs=1e-4)
    # masking the miss and the false alarm leaves the hit: CSI = 1; NaN under the mask is ignored
    mask = torch.tensor([False, True, False, True]).view(1, 1, 1, 2, 2)
    target_nan = torch.where(mask, target, torch.nan)
    assert loss(forecast, target_nan, mask).item() == pytest.approx(0.0, abs=1e-4)
    # differentiable: raising a missed pixel lowers the loss
    soft = SoftCSI([1.0], temperature=0.05, transform=transform)
    pred = forecast.clone().requires_grad_()
    soft(pred, target).backward()
    assert pred.grad.view(-1)[2] < 0  # the miss: predicting more rain there helps


def test_loss_sum_weights_its_terms():
    from nowcast.losses import LossSum

    pred, target = torch.zeros(1, 1, 1, 2, 2), torch.full((1, 1, 1, 2, 2), 2.0)
    total = LossSum([MaskedMSE(), MaskedMAE()], [1.0, 0.5])
    assert total(pred, target).item() == pytest.approx(4.0 + 0.5 * 2.0)
    with pytest.raises(ValueError, match="one weight per term"):
        LossSum([MaskedMSE()], [1.0, 2.0])


def test_physical_mae_decodes_first():
    from nowcast.data.transforms import LogRainRate
    from nowcast.losses import PhysicalMAE

    transform = LogRainRate()
    pred = transform.encode(torch.tensor([1.0, 10.0, 50.0]).view(1, 3, 1, 1, 1))
    target = transform.encode(torch.tensor([2.0, 10.0, 0.0]).view(1, 3, 1, 1, 1))
    mask = torch.tensor([True, True, False]).view(1, 3, 1, 1, 1)
    assert PhysicalMAE(transform)(pred, target, mask).item() == pytest.approx(0.5, rel=1e-4)


def test_balanced_loss_with_a_csi_term_equals_the_sum():
    from nowcast.data.transforms import LogRainRate
    from nowcast.losses import LossSum, SoftCSI

    torch.manual_seed(0)
    transform = LogRainRate()
    pred, target = torch.rand(2, 3, 1, 4, 4), torch.rand(2, 3, 1, 4, 4)
    mask = torch.rand(2, 3, 1, 4, 4) > 0.2
    combined = BalancedMSEMAE(transform=transform, csi_weight=0.1, csi_thresholds=[1.0])
    separate = LossSum([BalancedMSEMAE(transform=transform), SoftCSI([1.0], transform=transform)], [1.0, 0.1])
    assert combined(pred, target, mask).item() == pytest.approx(separate(pred, target, mask).item())


def test_quantile_loss_by_hand():
    from nowcast.losses import QuantileLoss

    # errors target - pred: +2 (under-forecast), -1 (over-forecast), masked +100
    pred, target = _t([1.0, 3.0, 0.0]), _t([3.0, 2.0, 100.0])
    mask = torch.tensor([True, True, False]).reshape(1, 3, 1, 1, 1)
    assert QuantileLoss(0.8)(pred, target, mask).item() == pytest.approx((0.8 * 2 + 0.2 * 1) / 2)
    # the median's loss is half the MAE
    assert QuantileLoss(0.5)(pred, target, mask).item() == pytest.approx(MaskedMAE()(pred, target, mask).item() / 2)
    with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\)"):
        QuantileLoss(1.0)


def test_quantile_loss_is_minimised_by_the_quantile():
    from nowcast.losses import QuantileLoss

    # one forecast value for 10 samples 0..9: the minimiser is the q-quantile
    target = torch.arange(10.0).view(1, 10, 1, 1, 1)
    pred = torch.zeros(1, 1, 1, 1, 1, requires_grad=True)
    optimizer = torch.optim.SGD([pred], lr=0.05)
    for _ in range(2000):
        optimizer.zero_grad()
        QuantileLoss(0.75)(pred.expand_as(target), target).backward()
        optimizer.step()
    # at 7 the slope changes sign: above it 8 of 10 samples pull down with 0.25 and 2
    # pull up with 0.75 (net down); below it 7 pull down, 3 pull up (net up)
    assert pred.item() == pytest.approx(7.0, abs=0.05)


def test_quantile_loss_in_physical_units():
    from nowcast.data.transforms import LogRainRate
    from nowcast.losses import QuantileLoss

    transform = LogRainRate()
    pred = transform.encode(torch.tensor([1.0, 10.0]).view(1, 2, 1, 1, 1))
    target = transform.encode(torch.tensor([3.0, 4.0]).view(1, 2, 1, 1, 1))
    # errors +2 (under) and -6 (over) mm/h at quantile 0.75: (0.75 * 2 + 0.25 * 6) / 2
    assert QuantileLoss(0.75, transform)(pred, target).item() == pytest.approx(1.5, rel=1e-4)


def _stroke(x0: float, size: int = 32) -> torch.Tensor:
    """A 2-pixel-wide vertical stroke at column ``x0``, as (1, 1, 1, size, size)."""
    img = torch.zeros(1, 1, 1, size, size)
    img[..., 8:24, int(x0) : int(x0) + 2] = 1.0
    return img


def test_multiscale_loss_scale_one_is_mse_and_masks_like_it():
    from nowcast.losses import MultiScaleLoss

    pred, target = torch.rand(2, 3, 1, 8, 8), torch.rand(2, 3, 1, 8, 8)
    assert MultiScaleLoss(scales=[1])(pred, target).item() == pytest.approx(MaskedMSE()(pred, target).item())
    assert MultiScaleLoss(MaskedMAE(), scales=[1])(pred, target).item() == pytest.approx(
        MaskedMAE()(pred, target).item())
    mask = torch.ones_like(pred, dtype=torch.bool)
    mask[..., :2, :] = False  # rows 0-1 invalid: pooled rows 0 (scale 2) and 0 (scale 4) too
    target[..., :2, :] = float("nan")  # a NaN under the mask must not leak
    loss = MultiScaleLoss(scales=[1, 2, 4])(pred, target, mask)
    assert torch.isfinite(loss)
    clean = target.nan_to_num(0.0)  # rows 0-1, excluded below
    expected = MaskedMSE()(pred[..., 2:, :], clean[..., 2:, :]).item() + sum(
        # the first pooled row holds an invalid pixel at scales 2 and 4
        MaskedMSE()(F.avg_pool2d(pred.flatten(0, 2), s)[..., 1:, :],
                    F.avg_pool2d(clean.flatten(0, 2), s)[..., 1:, :]).item()
        for s in (2, 4)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_multiscale_loss_pulls_a_displaced_stroke_towards_its_target():
    """The reason it exists: a stroke moved 5.5 px too little gets no pull from plain MSE
    (forecast and target do not overlap) but a pull the right way from the pyramid."""
    from nowcast.losses import MultiScaleLoss
    from nowcast.models.warp import warp

    frame, target = _stroke(10), _stroke(20)  # the truth moved 10 px to the right
    shift = torch.tensor(4.5, requires_grad=True)  # the forecast moves it 4.5 px (off-grid)
    grads = {}
    for name, loss_fn in (("mse", MaskedMSE()), ("pyramid", MultiScaleLoss(scales=[1, 2, 4, 8]))):
        shift.grad = None
        displacement = torch.stack((shift, torch.zeros(()))).view(1, 1, 2, 1, 1).expand(1, 1, 2, 32, 32)
        pred = warp(frame[:, 0], displacement)  # (1, 1, 1, 32, 32)
        loss_fn(pred, target).backward()
        grads[name] = shift.grad.item()
    assert abs(grads["mse"]) < 1e-6
    assert grads["pyramid"] < -1e-3  # descending increases the shift, towards 10 px


def test_multiscale_loss_rejects_a_scale_that_does_not_divide_the_frame():
    from nowcast.losses import MultiScaleLoss

    with pytest.raises(ValueError, match="scale 3 does not divide the frame size"):
        MultiScaleLoss(scales=[1, 3])(torch.rand(1, 1, 1, 8, 8), torch.rand(1, 1, 1, 8, 8))
    with pytest.raises(ValueError, match="2 weights for 3 scales"):
        MultiScaleLoss(scales=[1, 2, 4], weights=[1.0, 1.0])
