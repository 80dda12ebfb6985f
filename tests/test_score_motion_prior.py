"""scripts/score_motion_prior.py: the radar_multi archives as configured, the prior-only
network, and a real score on BoM frames from ../shared (skipped when absent)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.conftest import shared_path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("score_motion_prior", ROOT / "scripts" / "score_motion_prior.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_archives_are_the_experiments_and_the_network_is_its_prior_alone():
    script = _script()
    data, sources = script.archives(ROOT)
    assert [s["name"] for s in sources] == ["bom", "knmi", "fmi", "rmi"]
    assert all("${" not in s["path"] and Path(s["path"]).is_absolute() for s in sources)
    assert (data["input_steps"], data["output_steps"], data["time_step"]) == (4, 6, "10min")
    assert set(script.DEFAULT_PERIODS) == {s["name"] for s in sources}
    net = script.prior_network(4, 6, prior_tile=256)
    assert net.motion_prior and net.prior_tile == 256 and not net.net.head.weight.detach().any()
    with pytest.raises(ValueError, match="a variant sets only"):
        script.prior_network(4, 6, max_speed=3)


@pytest.mark.shared_data
def test_scores_the_prior_on_real_bom_frames():
    """BoM's 256 km domain is one 256 px tile: the tiled prior is the whole-frame one; the
    refined prior differs, and optical flow is scored on the same windows."""
    pytest.importorskip("pysteps")
    script = _script()
    data, sources = script.archives(ROOT)
    bom = next(s for s in sources if s["name"] == "bom")
    shared_path("radar", Path(bom["path"]).name)
    from nowcast.data.radar import RadarDataModule
    from nowcast.data.transforms import LogRainRate

    transform = LogRainRate(offset=0.01, scale=4.0)
    dm = RadarDataModule(path=bom["path"], downsample=2, transform=transform, time_step="10min",
                         input_steps=4, output_steps=6, test_period=["2020-10-31T06:00", "2020-10-31T07:40"],
                         pad_multiple=16, batch_size=2)
    dm.setup("test")
    nets = {"whole": script.prior_network(4, 6), "t256": script.prior_network(4, 6, prior_tile=256),
            "refined": script.prior_network(4, 6, prior_refine=32, prior_trajectory=True)}
    from nowcast.baselines import get_baseline

    windows, scores, seconds = script.score(dm, transform, nets, 6, {"optical_flow": get_baseline("optical_flow")})
    assert windows >= 1
    assert scores["whole"] == scores["t256"]
    assert scores["refined"] != scores["whole"]
    assert set(seconds) == {"whole", "t256", "refined", "optical_flow"} and min(seconds.values()) > 0
    assert 0.0 < scores["optical_flow"]["/csi_1mmh/lead01"] <= 1.0
    assert 0.0 < scores["whole"]["/csi_1mmh/lead01"] <= 1.0
    assert torch.isfinite(torch.tensor(scores["whole"]["/mae/lead06"]))
