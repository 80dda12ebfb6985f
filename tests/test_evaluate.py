"""evaluate: non-finite weights and forecasts, strict JSON, moved data, train/test overlap."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nowcast.evaluate import evaluate, metrics_json, period_overlap
from tests.conftest import TINY, compose_config


def _checkpoint(tmp_path: Path, *overrides: str, poison: str | None = None) -> Path:
    """A real checkpoint of an untrained TINY model (weights as initialised), with the run
    config stored as nowcast.train stores it; ``poison``: a weight set to NaN."""
    cfg = compose_config("train", TINY + ["callbacks.forecast_plots=null", *overrides], tmp_path / "train")
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_config.pop("hydra")
    state = instantiate(cfg.model).state_dict()
    if poison:
        state[poison].view(-1)[:3] = float("nan")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "nowcast_config": run_config, "epoch": 0, "global_step": 0}, path)
    return path


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_nan_weights_are_an_error_or_a_flagged_result(tmp_path):
    state_keys = list(instantiate(compose_config("train", TINY, tmp_path / "k").model).state_dict())
    poison = next(k for k in state_keys if k.endswith("weight"))
    ckpt = _checkpoint(tmp_path, poison=poison)
    ecfg = compose_config("evaluate", [f"ckpt_path={ckpt}", "plot_samples=1"], tmp_path / "eval")
    with pytest.raises(FloatingPointError, match=rf"{ckpt} has non-finite weights: {poison} \(3 of"):
        evaluate(ecfg)
    out = Path(ecfg.paths.output_dir)
    assert not (out / "metrics.json").exists()

    ecfg = compose_config("evaluate", [f"ckpt_path={ckpt}", "plot_samples=1", "allow_nonfinite=true"],
                          tmp_path / "eval")
    results = evaluate(ecfg)
    assert math.isnan(results["model"]["test/mse"])
    assert math.isfinite(results["persistence"]["test/mse"])
    stored = _strict_json((out / "metrics.json").read_text())  # no bare NaN
    assert stored["model"]["test/mse"] is None
    assert "non-finite" in stored["_null_reasons"]["model"]["test/mse"]
    assert stored["persistence"]["test/mse"] == pytest.approx(results["persistence"]["test/mse"])
    flags = {f["flag"] for f in stored["_flags"]}
    assert flags == {"nonfinite_weights", "nonfinite_forecast"}
    table = (out / "metrics.md").read_text()
    assert table.startswith("> **WARNING (nonfinite_weights)**") and "**nan**" in table
    assert "n/a" not in table


def test_metrics_json_is_strict():
    text = metrics_json({"model": {"test/mse": float("nan"), "test/mae": 0.5, "test/x": float("inf")}}, [])
    stored = _strict_json(text)
    assert stored["model"] == {"test/mse": None, "test/mae": 0.5, "test/x": None}
    assert set(stored["_null_reasons"]["model"]) == {"test/mse", "test/x"}


def test_moved_data_names_the_stored_path_and_the_override(tmp_path):
    moved = tmp_path / "moved" / "mnist_test_seq.npy"
    ckpt = _checkpoint(tmp_path, f"+data.test_file={moved}")
    ecfg = compose_config("evaluate", [f"ckpt_path={ckpt}"], tmp_path / "eval")
    with pytest.raises(FileNotFoundError) as info:
        evaluate(ecfg)
    message = str(info.value)
    assert "comes from the config stored in checkpoint" in message and str(moved) in message
    assert f"python evaluate.py ckpt_path={ckpt}" in message and "data.test_file=<new location>" in message
    # The natural override, without '+': any stored data key.
    ecfg = compose_config("evaluate", [f"ckpt_path={ckpt}", "data.test_file=null", "data.batch_size=4",
                                       "plot_samples=0"], tmp_path / "eval")
    assert math.isfinite(evaluate(ecfg)["model"]["test/mse"])


def test_data_keys_override_without_plus(tmp_path):
    cfg = compose_config("evaluate", ["ckpt_path=x", "data.path=/new/place", "data.val_period=[a,b]"],
                         tmp_path)
    assert cfg.data == {"path": "/new/place", "val_period": ["a", "b"]}


@pytest.mark.parametrize("stored, test_period, overlaps", [
    ({"train_period": ["2020-01-01", "2020-06-30"]}, ["2020-06-01", "2020-07-31"], True),
    ({"train_period": ["2020-01-01", "2020-06-30"]}, ["2020-07-01", "2020-07-31"], False),
    # train_period null: every frame outside the stored val/test periods was trained on
    ({"train_period": None, "test_period": ["2020-07-01", "2020-07-31"]}, ["2020-07-05", "2020-07-10"], False),
    ({"train_period": None, "test_period": ["2020-07-01", "2020-07-31"]}, ["2020-03-01", "2020-03-31"], True),
    ({"val_size": 4}, ["2020-03-01", "2020-03-31"], False),  # no periods (Moving-MNIST)
])
def test_train_test_period_overlap(stored, test_period, overlaps):
    evaluated = {**stored, "test_period": test_period}
    message = period_overlap(stored, evaluated, "run/best.ckpt")
    assert (message is not None) == overlaps
    if overlaps:
        assert "run/best.ckpt" in message and "trained on" in message


def test_period_overlap_of_a_multi_archive_checkpoint_is_per_archive(tmp_path):
    """data.path scores one archive of a radar_multi checkpoint: its held-out periods are
    that archive's (one or several), not the datamodule's; an archive never trained on is
    not flagged."""
    bom, knmi, other = tmp_path / "bom", tmp_path / "knmi", tmp_path / "other"
    stored = {"train_period": None, "val_period": None, "test_period": None, "archives": [
        {"name": "bom", "path": str(bom), "val_period": ["2020-10-31T06:00", "2020-10-31T07:50"],
         "test_period": ["2020-10-31T08:00", "2020-10-31T11:50"]},
        {"name": "knmi", "path": str(tmp_path / "x" / ".." / "knmi"),
         "test_period": [["2021-02-02T00:00", "2021-02-02T23:59"], ["2021-02-04T00:00", "2021-02-04T23:59"]]},
    ]}

    def overlap(path, test_period):
        return period_overlap(stored, {**stored, "path": str(path), "test_period": test_period}, "run/best.ckpt")

    assert overlap(bom, ["2020-10-31T08:00", "2020-10-31T11:50"]) is None
    assert overlap(knmi, [["2021-02-02T00:00", "2021-02-02T23:59"], ["2021-02-04T00:00", "2021-02-04T23:59"]]) is None
    message = overlap(knmi, [["2021-02-02T00:00", "2021-02-02T23:59"], ["2021-02-03T00:00", "2021-02-03T23:59"]])
    assert "2021-02-03" in message and "2021-02-02" not in message and "trained on" in message
    assert "trained on" in overlap(bom, ["2020-10-31T05:00", "2020-10-31T05:50"])
    assert overlap(other, ["2020-10-31T05:00", "2020-10-31T05:50"]) is None  # never trained on


def _old_loop(ckpt: Path, baselines: list[str]) -> dict[str, dict[str, float]]:
    """evaluate's own test loop as it was before it ran through Trainer.test (commit
    b9c7bd8), kept here as the reference for the numbers."""
    from nowcast.baselines import get_baseline
    from nowcast.evaluate import load_run
    from nowcast.lit_module import compute_scores, update_scores

    model, datamodule, _ = load_run(ckpt)
    methods = {name: get_baseline(name) for name in baselines}
    datamodule.prepare_data()
    datamodule.setup("test")
    transform = model.transform
    lead_times = model.lead_times or getattr(datamodule, "lead_times", None)
    scores = {m: model.make_scores(**model.score_kwargs) for m in ["model", *methods]}
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            inputs, mask = batch["inputs"], batch.get("mask")
            target = transform.decode(batch["targets"].float())
            forecast = transform.decode(model(inputs).float())
            update_scores(scores["model"], forecast, target, mask)
            past = transform.decode(inputs.float())
            for name, baseline in methods.items():
                update_scores(scores[name], baseline(past, model.num_leads).to(dtype=forecast.dtype),
                              target, mask)
    return {m: compute_scores(s, "test", lead_times) for m, s in scores.items()}


def test_evaluate_through_trainer_test_equals_the_old_loop(tmp_path):
    ckpt = _checkpoint(tmp_path, "data.test_size=24")  # 3 batches of 8
    ecfg = compose_config("evaluate", [f"ckpt_path={ckpt}", "plot_samples=1", "accelerator=cpu",
                                       "baselines=[persistence]"], tmp_path / "eval")
    new = evaluate(ecfg)
    old = _old_loop(ckpt, ["persistence"])
    assert set(new) == set(old) == {"model", "persistence"}
    for method in old:
        assert set(new[method]) == set(old[method])
        for key, value in old[method].items():
            assert new[method][key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), (method, key)
    assert len(old["model"]) > 20  # overall and per-lead scores were compared
