"""Shared fixtures: the real configs, composed with tiny CPU overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import nowcast  # noqa: F401 - registers the Hydra resolvers and stores that configs/ use
from nowcast.nn import backend

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()

#: Tiny Moving-MNIST + a two-level network: one epoch takes a few seconds on a CPU.
TINY = [
    "data.frame_size=32",
    "data.input_steps=4",
    "data.output_steps=3",
    "data.train_size=32",
    "data.val_size=16",
    "data.test_size=16",
    "data.batch_size=8",
    "model.net.hidden_channels=[8,8]",
    "trainer.max_epochs=1",
    "trainer.check_val_every_n_epoch=1",  # trainer=cpu validates every 4th epoch
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar.refresh_rate=0",
]


def compose_config(name: str, overrides: list[str], tmp_path: Path) -> DictConfig:
    """Compose ``configs/<name>.yaml`` as ``@hydra.main`` would, outputs under tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.job.num = 0
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.log_dir = str(tmp_path / "logs")
        # generated val/test sets go to tmp, not into the repository's data/
        cfg.paths.data_dir = str(tmp_path / "data")
    HydraConfig.instance().set_config(cfg)
    GlobalHydra.instance().clear()
    return cfg


def pytest_addoption(parser):
    parser.addoption(
        "--nn-reference", action="store_true",
        help="run with every nowcast.nn fast path off (nowcast.nn.backend.reference()); "
             "tests of a fast path switch it on themselves",
    )


@pytest.fixture(autouse=True, scope="session")
def _nn_backend(request):
    """The whole session on the reference path with ``--nn-reference``."""
    if request.config.getoption("--nn-reference"):
        with backend.reference():
            yield
    else:
        yield


@pytest.fixture
def train_cfg(tmp_path):
    """``configs/train.yaml`` with TINY overrides; extra overrides via ``train_cfg(...)``."""

    def make(*extra: str) -> DictConfig:
        return compose_config("train", TINY + list(extra), tmp_path)

    return make


def shared_path(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the ../shared data folder is not beside this checkout)")
    return path
