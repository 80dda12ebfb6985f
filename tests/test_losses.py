"""Masked losses against hand-computed values."""

import math

import pytest
import torch

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
