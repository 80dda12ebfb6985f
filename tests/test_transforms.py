"""Value transforms: exact inverses, no negative rain, Z-R conversions checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nowcast.data.transforms import (
    DBZScaled,
    Identity,
    LogRainRate,
    ScaledRainRate,
    dbz_to_rain_rate,
    rain_rate_to_dbz,
)

RATES = torch.tensor([0.0, 0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 30.0, 90.0, 250.0], dtype=torch.float64)


@pytest.mark.parametrize("transform", [LogRainRate(), LogRainRate(0.1, 2.0), ScaledRainRate(), DBZScaled()])
def test_decode_inverts_encode_and_never_rains_negative(transform):
    assert transform.units == "mm/h"
    assert float(transform.encode(torch.zeros(()))) == 0.0  # "no rain" is 0 in network space
    rates = RATES if not isinstance(transform, DBZScaled) else RATES[(RATES == 0) | (RATES >= 0.01)]
    torch.testing.assert_close(transform.decode(transform.encode(rates)), rates, rtol=1e-9, atol=1e-12)
    rates32 = rates.float()
    torch.testing.assert_close(transform.decode(transform.encode(rates32)), rates32, rtol=1e-5, atol=1e-6)
    y = torch.linspace(-3, 2, 101)
    assert (transform.decode(y) >= 0).all()
    assert transform.encode(RATES).diff().ge(0).all()  # monotone


def test_log_rain_rate_values_by_hand():
    t = LogRainRate(offset=0.01, scale=4.0)
    # log10(100 + 0.01) - log10(0.01) = 4.0000434
    assert float(t.encode(torch.tensor(100.0))) == pytest.approx((math.log10(100.01) + 2) / 4)
    assert float(t.encode(torch.tensor(-1.0))) == 0.0  # negative rain clipped
    assert float(ScaledRainRate(50.0).encode(torch.tensor(25.0))) == 0.5


def test_zr_relations_by_hand():
    # Marshall-Palmer: R = 1 mm/h -> 10 log10(200) = 23.0103 dBZ; x10 rain -> +16 dBZ
    assert float(rain_rate_to_dbz(torch.tensor(1.0))) == pytest.approx(23.0103, abs=1e-4)
    assert float(rain_rate_to_dbz(np.float64(10.0))) == pytest.approx(39.0103, abs=1e-4)
    # HKO: Z = 58.53 R^1.56; R = 10 -> 10 log10(58.53) + 15.6 = 33.2738 dBZ
    assert float(rain_rate_to_dbz(np.float64(10.0), 58.53, 1.56)) == pytest.approx(33.2738, abs=1e-4)
    dbz = np.array([-10.0, 0.0, 23.0103, 45.0, 60.0])
    back = rain_rate_to_dbz(dbz_to_rain_rate(dbz, 58.53, 1.56), 58.53, 1.56)
    np.testing.assert_allclose(back, dbz, rtol=1e-12)
    np.testing.assert_allclose(dbz_to_rain_rate(torch.from_numpy(dbz)).numpy(), dbz_to_rain_rate(dbz))
    assert np.isneginf(rain_rate_to_dbz(np.zeros(1)))[0]


def test_dbz_scaled_threshold_and_range():
    t = DBZScaled(a=200.0, b=1.6, dbz_min=-10.0, dbz_max=70.0)
    assert t.r_min == pytest.approx((0.1 / 200.0) ** (1 / 1.6))
    # 23.0103 dBZ (1 mm/h) -> (23.0103 + 10) / 80
    assert float(t.encode(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(33.0103 / 80, abs=1e-6)
    assert float(t.decode(t.encode(torch.tensor(t.r_min / 2)))) == 0.0  # trace rain -> none
    with pytest.raises(ValueError, match="dbz_max"):
        DBZScaled(dbz_min=10, dbz_max=0)


def test_identity_unchanged():
    x = torch.rand(3)
    assert Identity().encode(x) is x and Identity().decode(x) is x and Identity().units == "1"
