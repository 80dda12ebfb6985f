"""Tests for nowcast.baselines: persistence, pysteps optical-flow extrapolation, registry."""

from __future__ import annotations

import sys

import pytest
import torch

from nowcast.baselines import BASELINES, OpticalFlowExtrapolation, get_baseline, persistence

SIZE = 48


def _blob(cx: float, cy: float, peak: float = 20.0, width: float = 4.0) -> torch.Tensor:
    """A Gaussian rain cell in mm/h centred on (x=cx, y=cy), shape (H, W)."""
    y, x = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    return peak * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width**2))


def _translating(u: float, v: float, n: int, x0: float = 16.0, y0: float = 18.0) -> torch.Tensor:
    """Frames of a blob moving by (u, v) px per step, shape (n, H, W)."""
    return torch.stack([_blob(x0 + u * k, y0 + v * k) for k in range(n)])


def _argmax_xy(field: torch.Tensor) -> tuple[int, int]:
    idx = int(field.argmax())
    return idx % SIZE, idx // SIZE


def test_persistence_repeats_last_frame():
    inputs = torch.randn(2, 4, 3, 5, 6)
    preds = persistence(inputs, num_leads=3)
    assert preds.shape == (2, 3, 3, 5, 6)
    for lead in range(3):
        torch.testing.assert_close(preds[:, lead], inputs[:, -1])
    preds[:, 0] += 1  # a copy, not a view of the inputs
    torch.testing.assert_close(preds[:, 1], inputs[:, -1])
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        persistence(inputs[0], 3)


def test_registry():
    assert set(BASELINES) == {"persistence", "optical_flow", "sprog"}
    assert get_baseline("persistence") is persistence
    with pytest.raises(ValueError, match="unknown baseline 'climatology'"):
        get_baseline("climatology")


def test_optical_flow_moves_the_blob():
    pytest.importorskip("pysteps")
    # sample 0 moves right and down, sample 1 left; channel 1 of sample 0 moves up
    frames = torch.stack(
        [
            torch.stack([_translating(2, 1, 7), _translating(0, -1, 7, y0=30)], dim=1),
            torch.stack([_translating(-2, 0, 7, x0=34), _translating(-2, 0, 7, x0=34)], dim=1),
        ]
    )  # (B=2, T=7, C=2, H, W)
    inputs, targets = frames[:, :4], frames[:, 4:]  # 4 past frames, 3 leads
    baseline = get_baseline("optical_flow", num_input_frames=3)
    preds = baseline(inputs, num_leads=3)
    assert preds.shape == targets.shape and preds.dtype == inputs.dtype
    assert torch.isfinite(preds).all() and (preds >= 0).all()

    mse_flow = ((preds - targets) ** 2).mean()
    mse_persistence = ((persistence(inputs, 3) - targets) ** 2).mean()
    assert mse_flow < 0.05 * mse_persistence
    for b, c in [(0, 0), (0, 1), (1, 0)]:
        for lead in range(3):
            assert _argmax_xy(preds[b, lead, c]) == _argmax_xy(targets[b, lead, c]), (b, c, lead)


def test_optical_flow_timestep_ratio_and_dry_input():
    pytest.importorskip("pysteps")
    inputs = _translating(2, 0, 4)[None, :, None]  # (1, 4, 1, H, W)
    half = OpticalFlowExtrapolation(timestep_ratio=0.5)(inputs, num_leads=2)
    full = OpticalFlowExtrapolation()(inputs, num_leads=1)
    # two half steps reach where one full step does, 2 px downstream of the last frame
    torch.testing.assert_close(half[:, 1], full[:, 0], atol=1e-3, rtol=0)
    assert _argmax_xy(full[0, 0, 0]) == (16 + 2 * 4, 18)
    # no rain at all: no motion, a dry forecast, no error
    dry = OpticalFlowExtrapolation()(torch.zeros(1, 3, 1, 16, 16), num_leads=2)
    assert (dry == 0).all()


def test_optical_flow_without_pysteps(monkeypatch):
    monkeypatch.setitem(sys.modules, "pysteps", None)  # `import pysteps` now fails
    with pytest.raises(ImportError, match=r"pip install 'nowcast\[pysteps\]'"):
        get_baseline("optical_flow")
    # persistence does not need it
    assert get_baseline("persistence")(torch.zeros(1, 2, 1, 4, 4), 2).shape == (1, 2, 1, 4, 4)


def test_sprog_moves_the_blob_and_smooths_what_it_cannot_predict():
    pytest.importorskip("pysteps")
    from nowcast.baselines import SProg

    frames = _translating(2, 1, 7)[None, :, None]  # (1, 7, 1, H, W)
    inputs, targets = frames[:, :4], frames[:, 4:]
    preds = get_baseline("sprog")(inputs, num_leads=3)
    assert preds.shape == targets.shape and torch.isfinite(preds).all() and (preds >= 0).all()
    assert ((preds - targets) ** 2).mean() < 0.01 * ((persistence(inputs, 3) - targets) ** 2).mean()
    for lead in range(3):
        assert _argmax_xy(preds[0, lead, 0]) == _argmax_xy(targets[0, lead, 0])

    # a large cell plus small cells that appear at random each frame: advection keeps
    # the last frame's small cells, S-PROG's AR models find them unpredictable and
    # smooth them away (mean absolute difference between neighbouring rows)
    g = torch.Generator().manual_seed(0)
    noisy = torch.stack([_blob(24, 24, peak=10, width=10) + 8 * (torch.rand(SIZE, SIZE, generator=g) > 0.9)
                         for _ in range(4)])[None, :, None]

    def roughness(field):
        return (field[1:] - field[:-1]).abs().mean().item()

    advected = get_baseline("optical_flow")(noisy, num_leads=6)[0, -1, 0]
    smoothed = SProg()(noisy, num_leads=6)[0, -1, 0]
    assert roughness(smoothed) < 0.5 * roughness(advected)
    assert smoothed.max() > 5  # the large cell is still there


def test_sprog_needs_ar_order_plus_one_frames_and_forecasts_dry_as_dry():
    pytest.importorskip("pysteps")
    from nowcast.baselines import SProg

    with pytest.raises(ValueError, match=r"ar_order=2 needs >= 3 input frames, got 2"):
        SProg()(_translating(2, 0, 2)[None, :, None], num_leads=1)
    with pytest.raises(ValueError, match="ar_order must be >= 1"):
        SProg(ar_order=0)
    dry = SProg()(torch.zeros(1, 3, 1, 32, 32), num_leads=2)
    assert dry.shape == (1, 2, 1, 32, 32) and (dry == 0).all()



@pytest.mark.parametrize("case", ["appears in the last frame", "one pixel", "vanishes"])
def test_sprog_falls_back_to_advection_where_pysteps_cannot_fit(case, caplog):
    pytest.importorskip("pysteps")
    from nowcast.baselines import SProg

    rain = torch.zeros(1, 4, 1, 64, 64)
    if case == "appears in the last frame":  # AR models see no variance: NaN
        rain[0, -1, 0, 30:34, 30:34] = 2.0
    elif case == "one pixel":  # singular matrix
        rain[0, :, 0, 30, 30] = 2.0
    else:  # almost nothing left in the last frame: pysteps' rain mask fails (IndexError)
        rain[0, :3, 0, 30:34, 30:34] = 2.0
        rain[0, 3, 0, 10, 10] = 0.5
    with caplog.at_level("DEBUG", logger="nowcast.baselines"):
        preds = SProg()(rain, 3)
    assert "plain advection for this field" in caplog.text
    torch.testing.assert_close(preds, OpticalFlowExtrapolation()(rain, 3))
