"""Tests for nowcast.metrics: hand-computed tiny fields, pysteps references, streaming."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)
from torchmetrics.utilities.data import dim_zero_sum

from nowcast.metrics import (
    CategoricalScores,
    ContinuousScores,
    FractionsSkillScore,
    ImageScores,
    _box_filter,
    flatten_scores,
    threshold_name,
)

THRESHOLDS = [0.5, 1.0, 5.0]
SCALES = [1, 2, 5, 8]


def _field(rows: list[list[float]]) -> torch.Tensor:
    """A single (H, W) field as (B=1, T=1, C=1, H, W)."""
    return torch.tensor(rows, dtype=torch.float32)[None, None, None]


def _rain(rng: np.random.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Intermittent rain in mm/h: ~40 % dry pixels, a heavy tail above 5 mm/h."""
    rate = rng.gamma(0.6, 3.0, size=shape) * (rng.random(shape) > 0.4)
    return torch.from_numpy(rate).float()


def _batches(seed: int = 0, n_batches: int = 2, shape=(3, 3, 2, 20, 20), masked=True):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        preds, target = _rain(rng, shape), _rain(rng, shape)
        mask = torch.from_numpy(rng.random(shape) > 0.15) if masked else None
        out.append((preds, target, mask))
    return out


def _metrics(num_leads: int = 3) -> list:
    return [
        ContinuousScores(num_leads),
        CategoricalScores(THRESHOLDS, num_leads),
        FractionsSkillScore(THRESHOLDS, SCALES, num_leads),
    ]


def _all_metrics(num_leads: int = 3) -> list:
    """Every metric; ImageScores ignores masks, so it is left out of the mask tests."""
    return [*_metrics(num_leads), ImageScores(num_leads, data_range=20.0)]


def _assert_scores_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12, equal_nan=True, msg=k)


# --------------------------------------------------------------------------------------
# Hand-computed values on tiny fields
# --------------------------------------------------------------------------------------


def test_continuous_hand_computed_with_mask():
    preds = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, math.nan]]])
    target = torch.tensor([[[0.0, 2.0], [5.0, 4.0]], [[0.0, 0.0], [3.0, 100.0]]])
    mask = torch.ones(2, 2, 2, dtype=torch.bool)
    mask[1, 1, 1] = False  # the NaN forecast and the 100 mm/h target are not scored
    # (T, H, W) -> (B=1, T=2, C=1, H, W)
    preds, target, mask = preds[None, :, None], target[None, :, None], mask[None, :, None]
    metric = ContinuousScores(num_leads=2)
    metric.update(preds, target, mask)
    s = metric.compute()
    # lead 1: errors 1, 0, -2, 0; lead 2: errors 1, 1, -2 (one pixel masked)
    expected = {
        "mse_per_lead": [5 / 4, 6 / 3],
        "mae_per_lead": [3 / 4, 4 / 3],
        "bias_per_lead": [-1 / 4, 0.0],
        "rmse_per_lead": [math.sqrt(5 / 4), math.sqrt(2)],
        "mse_frame_per_lead": [5.0, 6.0],
        "mae_frame_per_lead": [3.0, 4.0],
        # pooled over the 7 valid pixels / 2 frames, not the mean of the leads
        "mse": 11 / 7,
        "mae": 7 / 7,
        "bias": -1 / 7,
        "rmse": math.sqrt(11 / 7),
        "mse_frame": 11 / 2,
        "mae_frame": 7 / 2,
    }
    assert set(s) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(s[k], torch.tensor(v, dtype=torch.float64), msg=k)


def test_categorical_hand_computed_with_mask_and_ties():
    preds = _field([[0.0, 1.0, 2.0], [0.5, 3.0, 0.0], [1.0, 0.0, 0.0]])
    target = _field([[1.0, 1.0, 0.0], [0.9, 2.0, 0.0], [0.0, 5.0, 0.0]])
    mask = torch.ones_like(preds, dtype=torch.bool)
    mask[..., 2, 0] = False  # would be a false alarm
    metric = CategoricalScores([1.0, 10.0], num_leads=1)
    metric.update(preds, target, mask)
    s = metric.compute()
    # value >= 1 is an event (ties at exactly 1.0 count): H=2, M=2, F=1, R=3
    assert metric.hits[0].tolist() == [2]
    assert metric.misses[0].tolist() == [2]
    assert metric.false_alarms[0].tolist() == [1]
    assert metric.correct_negatives[0].tolist() == [3]
    expected = {"csi": 2 / 5, "pod": 2 / 4, "far": 1 / 3, "hss": 8 / 32, "ets": 0.5 / 3.5}
    for score, v in expected.items():
        torch.testing.assert_close(s[f"{score}_1mmh"], torch.tensor(v, dtype=torch.float64))
        # torchmetrics squeezes one-element results: (num_leads=1,) comes back 0-d
        assert s[f"{score}_1mmh_per_lead"].numel() == 1
    # no event at 10 mm/h in either field: every score has a zero denominator -> NaN
    for score in expected:
        assert torch.isnan(s[f"{score}_10mmh"]), score


def test_fss_hand_computed_with_border_and_mask():
    # forecast rain in a corner, observed rain in the centre of a 3x3 field
    preds = _field([[9.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    target = _field([[0.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 0.0]])
    metric = FractionsSkillScore([1.0], [1, 3], num_leads=1)
    metric.update(preds, target)
    s = metric.compute()
    # 3 px: zero padding, divide by 9. Pf = 1/9 on the 4 pixels whose window holds the
    # corner, Po = 1/9 everywhere: sum Pf^2 = 4/81, Po^2 = 9/81, PfPo = 4/81
    torch.testing.assert_close(s["fss_1mmh_3px"], torch.tensor(1 - 5 / 13, dtype=torch.float64))
    torch.testing.assert_close(s["fss_1mmh_1px"], torch.tensor(0.0, dtype=torch.float64))

    # Masking (2, 2) where both fields rain hard: non-event in both before filtering,
    # and its fractions leave the sums (sum Po^2 = 8/81).
    preds[..., 2, 2] = target[..., 2, 2] = 50.0
    mask = torch.ones_like(preds, dtype=torch.bool)
    mask[..., 2, 2] = False
    metric = FractionsSkillScore([1.0], [3], num_leads=1)
    metric.update(preds, target, mask)
    torch.testing.assert_close(
        metric.compute()["fss_1mmh_3px"], torch.tensor(1 - 4 / 12, dtype=torch.float64)
    )


def test_image_scores_hand_computed():
    target = torch.rand(2, 2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    metric = ImageScores(num_leads=2, data_range=1.0)
    preds = target.clone()
    preds[:, 1] += 0.1  # lead 2: MSE 0.01 -> PSNR 10 log10(1 / 0.01) = 20 dB
    metric.update(preds, target)
    s = metric.compute()
    torch.testing.assert_close(s["ssim_per_lead"][0], torch.tensor(1.0, dtype=torch.float64))
    assert torch.isinf(s["psnr_per_lead"][0])  # exact frames
    torch.testing.assert_close(
        s["psnr_per_lead"][1], torch.tensor(20.0, dtype=torch.float64), rtol=1e-5, atol=1e-4
    )


# --------------------------------------------------------------------------------------
# Independent references: pysteps and torchmetrics
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pysteps_verification():
    pytest.importorskip("pysteps")
    from pysteps.verification import detcatscores, detcontscores, spatialscores

    return detcatscores, detcontscores, spatialscores


def test_continuous_and_categorical_match_pysteps(pysteps_verification):
    detcat, detcont, _ = pysteps_verification
    batches = _batches(seed=1, n_batches=2)
    cont, cat = ContinuousScores(3), CategoricalScores(THRESHOLDS, 3)
    for preds, target, mask in batches:
        cont.update(preds, target, mask)
        cat.update(preds, target, mask)
    s_cont, s_cat = cont.compute(), cat.compute()

    def valid_pixels(lead: int | None) -> tuple[np.ndarray, np.ndarray]:
        leads = slice(None) if lead is None else slice(lead, lead + 1)
        p = np.concatenate([b[0][:, leads][b[2][:, leads]].numpy() for b in batches])
        o = np.concatenate([b[1][:, leads][b[2][:, leads]].numpy() for b in batches])
        return p.astype(np.float64), o.astype(np.float64)

    for lead in [0, 1, 2, None]:
        p, o = valid_pixels(lead)
        ref = detcont.det_cont_fct(p, o, scores=["MSE", "MAE", "ME", "RMSE"])
        for ours, theirs in [("mse", "MSE"), ("mae", "MAE"), ("bias", "ME"), ("rmse", "RMSE")]:
            got = s_cont[ours] if lead is None else s_cont[ours + "_per_lead"][lead]
            assert got.item() == pytest.approx(ref[theirs], rel=1e-6), (ours, lead)
        for thr in THRESHOLDS:
            ref = detcat.det_cat_fct(p, o, thr, scores=["CSI", "POD", "FAR", "HSS", "ETS"])
            for score in ["csi", "pod", "far", "hss", "ets"]:
                key = f"{score}_{threshold_name(thr)}"
                got = s_cat[key] if lead is None else s_cat[key + "_per_lead"][lead]
                assert got.item() == pytest.approx(ref[score.upper()], rel=1e-9), (key, lead)


def test_fss_matches_pysteps_without_mask(pysteps_verification):
    spatial = pysteps_verification[2]
    batches = _batches(seed=2, n_batches=2, shape=(2, 3, 2, 17, 22), masked=False)
    metric = FractionsSkillScore(THRESHOLDS, SCALES, num_leads=3)
    for preds, target, _ in batches:
        metric.update(preds, target)
    s = metric.compute()
    for thr in THRESHOLDS:
        for scale in SCALES:
            key = f"fss_{threshold_name(thr)}_{scale}px"
            pooled = spatial.fss_init(thr, scale)
            for lead in range(3):
                ref = spatial.fss_init(thr, scale)
                for preds, target, _ in batches:
                    for b in range(preds.shape[0]):
                        for c in range(preds.shape[2]):
                            f = preds[b, lead, c].double().numpy()
                            o = target[b, lead, c].double().numpy()
                            spatial.fss_accum(ref, f, o)
                            spatial.fss_accum(pooled, f, o)
                got = s[key + "_per_lead"][lead].item()
                assert got == pytest.approx(spatial.fss_compute(ref), abs=1e-12), (key, lead)
            assert s[key].item() == pytest.approx(spatial.fss_compute(pooled), abs=1e-12), key


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 8, 25])
def test_box_filter_matches_scipy_uniform_filter(size):
    field = (np.random.default_rng(size).random((2, 13, 18)) > 0.7).astype(np.float64)
    ref = np.stack([uniform_filter(f, size=size, mode="constant", cval=0.0) for f in field])
    np.testing.assert_allclose(_box_filter(torch.from_numpy(field), size).numpy(), ref, atol=1e-15)


def test_image_scores_match_torchmetrics_per_frame_mean():
    gen = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        preds = torch.rand(2, 3, 2, 16, 16, generator=gen)
        target = (preds + 0.2 * torch.rand(preds.shape, generator=gen)).clamp(0, 1)
        batches.append((preds, target))
    metric = ImageScores(num_leads=3)
    for preds, target in batches:
        metric.update(preds, target)
    s = metric.compute()
    preds = torch.cat([b[0] for b in batches])  # (4, 3, 2, 16, 16)
    target = torch.cat([b[1] for b in batches])
    for lead in range(3):
        ssim = structural_similarity_index_measure(
            preds[:, lead], target[:, lead], data_range=1.0, reduction="none"
        )
        psnr = [
            peak_signal_noise_ratio(p, t, data_range=1.0)
            for p, t in zip(preds[:, lead], target[:, lead])
        ]
        assert s["ssim_per_lead"][lead].item() == pytest.approx(ssim.mean().item(), rel=1e-5)
        assert s["psnr_per_lead"][lead].item() == pytest.approx(
            torch.stack(psnr).mean().item(), rel=1e-5
        )
    assert s["ssim"].item() == pytest.approx(s["ssim_per_lead"].mean().item(), rel=1e-9)


# --------------------------------------------------------------------------------------
# Streaming: several updates, merged states, DDP reduction, masks, errors
# --------------------------------------------------------------------------------------


def test_several_updates_equal_one_update():
    batches = _batches(seed=4, n_batches=3)
    whole = [torch.cat([b[i] for b in batches]) for i in range(3)]
    for streamed, once in zip(_all_metrics(), _all_metrics()):
        for preds, target, mask in batches:
            streamed.update(preds, target, mask)
        once.update(*whole)
        _assert_scores_equal(streamed.compute(), once.compute())


def test_states_are_sum_reduced_and_merge():
    batches = _batches(seed=5, n_batches=2)
    whole = [torch.cat([b[i] for b in batches]) for i in range(3)]
    for rank0, rank1, once, summed in zip(
        _all_metrics(), _all_metrics(), _all_metrics(), _all_metrics()
    ):
        assert rank0._reductions and all(fx is dim_zero_sum for fx in rank0._reductions.values()), (
            type(rank0).__name__
        )
        rank0.update(*batches[0])
        rank1.update(*batches[1])
        once.update(*whole)
        # what DDP's all-reduce does: add every state over ranks
        for name in rank0._defaults:
            setattr(summed, name, getattr(rank0, name) + getattr(rank1, name))
        summed._update_count = 1
        rank0.merge_state(rank1)
        _assert_scores_equal(rank0.compute(), once.compute())
        _assert_scores_equal(summed.compute(), once.compute())


def test_masked_pixels_have_no_effect():
    preds, target, mask = _batches(seed=6, n_batches=1)[0]
    noise = _rain(np.random.default_rng(7), tuple(preds.shape)) * 100
    preds2 = torch.where(mask, preds, noise)
    target2 = torch.where(mask, target, -noise)
    target2[~mask & (noise > 50)] = math.nan
    for a, b in zip(_metrics(), _metrics()):
        a.update(preds, target, mask)
        b.update(preds2, target2, mask)
        _assert_scores_equal(a.compute(), b.compute())
        assert not any(torch.isnan(v).any() for v in a.compute().values())


@pytest.mark.parametrize(
    "make",
    [
        lambda: ContinuousScores(3),
        lambda: CategoricalScores([1.0], 3),
        lambda: FractionsSkillScore([1.0], [3], 3),
        lambda: ImageScores(3),
    ],
)
def test_wrong_num_leads_raises(make):
    metric = make()
    x = torch.zeros(1, 4, 1, 12, 12)
    with pytest.raises(ValueError, match=r"num_leads=3.*T=4"):
        metric.update(x, x)
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        metric.update(x[0], x[0])
    with pytest.raises(ValueError, match="mask"):
        metric.update(x[:, :3], x[:, :3], torch.ones(1, 3, 1, 12, 11, dtype=torch.bool))


def test_zero_count_gives_nan_not_error():
    metric = ContinuousScores(2)
    x = torch.ones(1, 2, 1, 4, 4)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, 0] = True  # lead 2 entirely masked
    metric.update(x, x + 1, mask)
    s = metric.compute()
    assert s["mse_per_lead"][0] == 1 and torch.isnan(s["mse_per_lead"][1])
    assert s["mse"] == 1 and s["mse_frame"] == 16  # the empty frame is not counted


def test_names():
    assert threshold_name(0.5) == "0p5mmh"
    assert threshold_name(10.0) == "10mmh"
    assert threshold_name(0.5, "") == "0p5"
    x = torch.ones(1, 1, 1, 4, 4)
    cat = CategoricalScores([0.5], 1, units_suffix="")
    cat.update(x, x)
    assert {"csi_0p5", "pod_0p5_per_lead", "far_0p5", "hss_0p5", "ets_0p5"} <= set(cat.compute())
    fss = FractionsSkillScore([1], [8], 1)
    fss.update(x, x)
    assert {"fss_1mmh_8px", "fss_1mmh_8px_per_lead"} == set(fss.compute())


def test_flatten_scores():
    scores = {"mse": torch.tensor(2.0), "mse_per_lead": torch.tensor([1.0, 3.0])}
    assert flatten_scores("test", scores) == {
        "test/mse": 2.0,
        "test/mse/lead01": 1.0,
        "test/mse/lead02": 3.0,
    }
    named = flatten_scores("val", scores, lead_names=["10min", "20min"])
    assert named == {"val/mse": 2.0, "val/mse/10min": 1.0, "val/mse/20min": 3.0}
    with pytest.raises(ValueError, match="lead_names"):
        flatten_scores("val", scores, lead_names=["10min"])
