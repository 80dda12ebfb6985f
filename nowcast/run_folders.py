"""Hydra set-up that must exist before any config is composed.

Imported by ``nowcast/__init__.py`` (light: no torch), so that composing ``configs/`` works
whatever was imported first:

* resolvers ``${nowcast.unique_time:}`` and ``${nowcast.run_dir:<resume>,<default>}`` used
  by ``configs/hydra/default.yaml`` for the run folder;
* the config ``evaluate_data_overrides`` (``configs/evaluate.yaml``'s defaults): ``data``
  as a dict open to new keys, so that ``data.path=<new>`` overrides a stored data key
  without Hydra's ``+`` (a YAML file cannot switch off struct mode for one node).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


def unique_time() -> str:
    """``2026-12-02_00-06-17_3fa9c1``: the start time plus 6 random hex digits.

    Registered as the cached resolver ``${nowcast.unique_time:}``: one value per composed
    config (like Hydra's ``${now:...}``, whose cache a sweep's jobs inherit), different for
    two runs started in the same second.
    """
    return f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder (the one holding ``.hydra/config.yaml``) of a run folder or a
    checkpoint inside one (``<run>/checkpoints/last.ckpt``, ``<run>/hpc_ckpt_3.ckpt``);
    None for a checkpoint that lives elsewhere (e.g. downloaded)."""
    path = Path(path).expanduser()
    for folder in (path, *path.parents[:2]):
        if (folder / ".hydra" / "config.yaml").is_file():
            return folder.resolve()
    return None


def run_dir(resume: str | None, default: str) -> str:
    """The run folder: ``resume``'s own folder when continuing a run in place, else
    ``default`` (``runs/<NOWCAST_RUN_ID | SLURM_JOB_ID | unique time>``).

    Registered as ``${nowcast.run_dir:<resume>,<default>}`` for ``hydra.run.dir``.
    """
    if resume:
        folder = run_folder_of(resume)
        if folder is not None:
            return str(folder)
    return default


def output_subdir(resume: str | None) -> str:
    """Where Hydra saves the composed config: ``.hydra``, or ``.hydra/resume_<time>`` when
    continuing a run in its folder, so that the run's original ``.hydra/config.yaml``
    (and overrides) is not overwritten by the resume command's composition.

    Registered (cached) as ``${nowcast.output_subdir:<resume>}`` for ``hydra.output_subdir``.
    """
    if resume and run_folder_of(resume) is not None:
        return f".hydra/resume_{unique_time()}"
    return ".hydra"


OmegaConf.register_new_resolver("nowcast.unique_time", unique_time, use_cache=True, replace=True)
OmegaConf.register_new_resolver("nowcast.run_dir", run_dir, replace=True)
OmegaConf.register_new_resolver("nowcast.output_subdir", output_subdir, use_cache=True, replace=True)




def _register_evaluate_data_overrides() -> None:
    node = OmegaConf.create({"data": {}})
    OmegaConf.set_struct(node.data, False)
    ConfigStore.instance().store(name="evaluate_data_overrides", node=node)


_register_evaluate_data_overrides()


def config_dir() -> str:
    """``configs/`` beside the package (source checkout / editable install) or in the cwd:
    the ``config_path`` of every console entry point (``nowcast-train``, ...)."""
    here = Path(__file__).resolve().parents[1] / "configs"
    return str(here if here.is_dir() else Path.cwd() / "configs")
