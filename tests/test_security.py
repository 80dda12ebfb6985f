"""Hostile checkpoints: the config stored in a checkpoint must not decide which code runs.

Each test writes a real ``.ckpt`` (``torch.save``) whose stored ``nowcast_config`` names a
callable that would write a file (``victim``) if it were ever called, and checks that
``load_run`` / ``evaluate`` / ``train`` refuse it with an error naming the target, and
that the file was not written.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nowcast.evaluate import evaluate, load_run
from nowcast.safe_config import ALLOWED_EXTERNAL, UntrustedConfigError, check_config, resolve_target
from nowcast.train import train
from tests.conftest import TINY, compose_config


@pytest.fixture
def good(tmp_path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A real run config (TINY Moving-MNIST) and the weights of the model it builds."""
    cfg = compose_config("train", TINY + ["callbacks.forecast_plots=null"], tmp_path)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_config.pop("hydra")
    model = instantiate(cfg.model)
    return run_config, model.state_dict()


def _ckpt(tmp_path: Path, run_config: dict, state_dict: dict, name: str = "hostile.ckpt") -> Path:
    path = tmp_path / name
    torch.save({"state_dict": state_dict, "nowcast_config": run_config, "epoch": 0,
                "global_step": 0}, path)
    return path


def _with(config: dict, dotted: str, value: Any) -> dict:
    out = copy.deepcopy(config)
    *parents, last = dotted.split(".")
    node = out
    for p in parents:
        node = node[p]
    node[last] = value
    return out


def test_the_unmodified_checkpoint_loads(tmp_path, good):
    """Control: the same harness with an honest config rebuilds model and data."""
    run_config, weights = good
    model, dm, run_cfg = load_run(_ckpt(tmp_path, run_config, weights))
    assert type(model).__name__ == "NowcastModule" and type(dm).__name__ == "MovingMNISTDataModule"
    for key, value in weights.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert run_cfg.model._target_ == "nowcast.lit_module.NowcastModule"


def test_plain_hydra_instantiate_would_write_the_file(tmp_path):
    """Why the check exists: Hydra itself calls builtins.open from a config."""
    victim = tmp_path / "victim.txt"
    instantiate({"_target_": "builtins.open", "_args_": [str(victim), "w"]}).close()
    assert victim.exists()


def _hostile_cases(victim: str) -> dict[str, tuple[str, Any, str]]:
    """name -> (dotted key in the run config, value planted there, target named in the error)."""
    touch = f"touch {victim}"
    return {
        "builtins.open as the model": (
            "model", {"_target_": "builtins.open", "_args_": [victim, "w"]}, "builtins.open"),
        "os.system as the datamodule": (
            "data", {"_target_": "os.system", "_args_": [touch]}, "os.system"),
        "subprocess.run inside the network": (
            "model.net", {"_target_": "subprocess.run", "_args_": [["touch", victim]]}, "subprocess.run"),
        "Path.write_text as a partial optimizer": (
            "model.optimizer", {"_target_": "pathlib.Path.write_text", "_partial_": True,
                                "self": victim, "data": "pwned"}, "pathlib.Path.write_text"),
        "nested inside an allowed optimizer": (
            "model.optimizer.lr", {"_target_": "os.system", "_args_": [touch]}, "os.system"),
        "through _args_ of an allowed class": (
            "model.transform", {"_target_": "nowcast.data.transforms.Identity",
                                "_args_": [{"_target_": "builtins.exec",
                                            "_args_": [f"open({victim!r}, 'w')"]}]}, "builtins.exec"),
        "inside a list": (
            "model.thresholds", [1.0, {"_target_": "builtins.eval",
                                       "_args_": [f"open({victim!r}, 'w')"]}], "builtins.eval"),
        "attribute path through a nowcast module to os": (
            "model.loss", {"_target_": "nowcast.cluster.os.system", "_args_": [touch]},
            "nowcast.cluster.os.system"),
        "attribute path through a nowcast module to subprocess": (
            "model.loss", {"_target_": "nowcast.cluster.subprocess.run", "_args_": [["touch", victim]]},
            "nowcast.cluster.subprocess.run"),
        "hydra's instantiate re-exported by a nowcast module": (
            "model.loss", {"_target_": "nowcast.evaluate.instantiate",
                           "config": {"_target_": "builtins.open"}}, "nowcast.evaluate.instantiate"),
        "pathlib.Path imported by a nowcast module": (
            "model.loss", {"_target_": "nowcast.evaluate.Path", "_args_": [victim]}, "nowcast.evaluate.Path"),
        "a nowcast function that moves files": (
            "model.loss", {"_target_": "nowcast.cluster._move_aside", "_args_": [victim]},
            "nowcast.cluster._move_aside"),
        "a classmethod of a nowcast class": (
            "model", {"_target_": "nowcast.lit_module.NowcastModule.load_from_checkpoint",
                      "_args_": [victim]}, "NowcastModule.load_from_checkpoint"),
        "an unused callback (resume builds callbacks too)": (
            "callbacks.evil", {"_target_": "subprocess.Popen", "_args_": [["touch", victim]]},
            "subprocess.Popen"),
    }


CASES = list(_hostile_cases("VICTIM"))


@pytest.mark.parametrize("case", CASES)
def test_hostile_checkpoint_is_refused_by_load_run(tmp_path, good, case):
    run_config, weights = good
    victim = tmp_path / "victim.txt"
    key, value, target = _hostile_cases(str(victim))[case]
    path = _ckpt(tmp_path, _with(run_config, key, value), weights)
    with pytest.raises(UntrustedConfigError, match=rf"{path}.*{target.replace('.', '[.]')}"):
        load_run(path)
    assert not victim.exists()


def test_interpolation_with_a_custom_resolver_is_never_resolved(tmp_path, good):
    """A resolver that would write the file, reached by an interpolation in the stored
    config: refused before OmegaConf ever resolves it."""
    victim = tmp_path / "victim.txt"
    OmegaConf.register_new_resolver("test_write_victim", lambda p: Path(p).write_text("pwned"),
                                    replace=True)
    run_config, weights = good
    for key, value in [("data.data_dir", f"${{test_write_victim:{victim}}}"),
                       ("model.optimizer.lr", "${oc.env:HOME}"),
                       ("model.net", {"_target_": "${test_write_victim:" + str(victim) + "}"})]:
        path = _ckpt(tmp_path, _with(run_config, key, value), weights)
        with pytest.raises(UntrustedConfigError, match="interpolation|dotted Python name"):
            load_run(path)
    assert not victim.exists()


def test_evaluate_and_train_refuse_a_hostile_checkpoint(tmp_path, good):
    run_config, weights = good
    victim = tmp_path / "victim.txt"
    hostile = _with(run_config, "model.optimizer", {"_target_": "os.system", "_partial_": True,
                                                    "_args_": [f"touch {victim}"]})
    path = _ckpt(tmp_path, hostile, weights)
    ecfg = compose_config("evaluate", [f"ckpt_path={path}"], tmp_path / "eval")
    with pytest.raises(UntrustedConfigError, match="os.system"):
        evaluate(ecfg)
    tcfg = compose_config("train", TINY + [f"ckpt_path={path}"], tmp_path / "train")
    with pytest.raises(UntrustedConfigError, match="os.system"):
        train(tcfg)
    assert not victim.exists()
    assert not (tmp_path / "eval" / "run" / "metrics.json").exists()
    assert not (tmp_path / "train" / "run" / "checkpoints").exists()


@pytest.mark.parametrize("bad, message", [
    ({"_target_": "nowcast.lit_module.NowcastModule", "_partial_": "yes"}, "must be true or false"),
    ({"_target_": "nowcast.lit_module.NowcastModule", "_recursive_": 0}, "must be true or false"),
    ({"_target_": "nowcast.lit_module.NowcastModule", "_convert_": "eval"}, "must be one of"),
    ({"_target_": "nowcast.lit_module.NowcastModule", "_args_": "x"}, "must be a list"),
    ({"_target_": 3}, "must be a dotted class name"),
    ({"_target_": "os"}, "not a dotted Python name"),
    ({"_target_": "nowcast.cluster"}, "is a module"),
    ({"_target_": "nowcast.nope.Thing"}, "no nowcast module"),
    ({"_target_": "nowcast.cluster.requeue_job"}, "not a nowcast class"),
    ({"_target_": "torch.optim.lr_scheduler.LambdaLR"}, "not allowed"),
    ({"_target_": "lightning.pytorch.callbacks.LambdaCallback"}, "not allowed"),
    ({"x": b"bytes"}, "not a YAML scalar"),
])
def test_check_config_rejects(bad, message):
    with pytest.raises(UntrustedConfigError, match=message):
        check_config(bad, source="test")


def test_allowlist_names_real_classes_and_covers_the_configs():
    for name in ALLOWED_EXTERNAL:
        assert isinstance(resolve_target(name), type), name
    # Every _target_ in configs/ outside Hydra's own settings (launcher; the sweepers of
    # hparams_search, which Hydra builds and no checkpoint stores) is nowcast's or allowlisted.
    root = Path(__file__).resolve().parents[1] / "configs"
    targets = {line.split("_target_:")[1].strip() for p in root.rglob("*.yaml")
               if "hydra" not in p.parts and "hparams_search" not in p.parts
               for line in p.read_text().splitlines() if "_target_:" in line}
    assert targets, "no targets found"
    for target in targets:
        assert isinstance(resolve_target(target), type), target


def test_checked_targets_are_resolved_once():
    """Hydra gets the class object, not the string, so it cannot resolve it differently."""
    checked = check_config({"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.1})
    assert checked["_target_"] is torch.optim.Adam
