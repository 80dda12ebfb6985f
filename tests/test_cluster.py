"""Cluster support without a cluster: batch split, device checks, run folders, launcher and
sbatch configs, preemption checkpoint + resume, and a 2-process DDP run (gloo on CPU).

The same features on a real SLURM: scripts/slurm/test_local_cluster.sh.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nowcast import cluster
from nowcast.evaluate import load_run
from nowcast.train import train
from tests.conftest import ROOT, TINY, compose_config

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_PROCID", "SLURM_NTASKS",
              "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "NOWCAST_RUN_ID", "RANK", "LOCAL_RANK")


@pytest.fixture(autouse=True)
def no_cluster_env(monkeypatch):
    """Tests start outside any SLURM job / DDP launch, whatever the shell they run in."""
    for key in SLURM_VARS:
        monkeypatch.delenv(key, raising=False)


# ------------------------------------------------------------------ batch size, devices
def test_global_batch_size_is_divided_over_ranks():
    assert cluster.per_device_batch_size(16, 4) == 4
    assert cluster.per_device_batch_size(8, 1) == 8
    with pytest.raises(ValueError, match=r"data.batch_size=10 is the global batch size .* 4 processes"
                                         r".* multiple of 4, e.g. data.batch_size=8 or 12"):
        cluster.per_device_batch_size(10, 4)


def test_datamodule_loaders_use_the_per_device_batch_size(tmp_path):
    cfg = compose_config("train", TINY + ["data.batch_size=8"], tmp_path)
    dm = instantiate(cfg.data)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # no launch yet
    assert cluster.set_per_device_batch_size(dm, trainer) == 4
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_dataloader().batch_size == 4 and dm.val_dataloader().batch_size == 4
    dm.batch_size = 9
    with pytest.raises(ValueError, match="data.batch_size=9 is the global batch size"):
        cluster.set_per_device_batch_size(dm, trainer)


def test_more_devices_than_the_node_has(monkeypatch, train_cfg):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"trainer.devices=4 .* this node has 1 CUDA GPU\(s\)"):
        cluster.check_devices("gpu", 4)
    with pytest.raises(ValueError, match="asks for 2 devices per node but this node has 1"):
        cluster.check_devices("cuda", [0, 1], num_nodes=2)
    cluster.check_devices("gpu", 1)
    cluster.check_devices("gpu", "auto")
    # through train(): stops before the trainer starts any process
    with pytest.raises(ValueError, match=r"trainer.devices=4096 .* CPU core\(s\)"):
        train(train_cfg("trainer.devices=4096"))


# ------------------------------------------------------------------------ run folders
def _run_dir(tmp_path, *overrides) -> str:
    return str(compose_config("train", list(overrides), tmp_path).hydra.run.dir)


def test_run_dir_is_the_slurm_job_id(monkeypatch, tmp_path):
    plain = _run_dir(tmp_path)
    assert re.search(r"/train/runs/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}$", plain), plain
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = _run_dir(tmp_path)
    assert first == str(tmp_path / "logs" / "train" / "runs" / "4242")
    monkeypatch.setenv("SLURM_PROCID", "1")         # another rank of the job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # the job after two requeues
    assert _run_dir(tmp_path) == first
    monkeypatch.setenv("NOWCAST_RUN_ID", "my-run")  # explicit (torchrun)
    assert _run_dir(tmp_path).endswith("/runs/my-run")


def test_lightning_subprocess_launcher_reuses_the_run_dir(tmp_path):
    """trainer.devices=2 without srun/torchrun: Lightning starts rank 1 as `python train.py
    ... hydra.run.dir=<rank 0's folder>` (not a new timestamp) with no .hydra/ of its own."""
    from lightning.fabric.strategies.launchers.subprocess_script import _hydra_subprocess_cmd

    cfg = compose_config("train", [], tmp_path)  # also sets HydraConfig, as @hydra.main does
    command, cwd = _hydra_subprocess_cmd(local_rank=1)
    assert f'hydra.run.dir="{cfg.hydra.run.dir}"' in command
    assert "hydra.output_subdir=null" in command and cwd == str(ROOT)


def test_log_file_on_rank_zero_only():
    import logging

    handler = logging.FileHandler(os.devnull)
    logging.getLogger().addHandler(handler)
    try:
        cluster.log_on_rank_zero_only(rank=0)
        assert handler in logging.getLogger().handlers
        cluster.log_on_rank_zero_only(rank=1)
        assert handler not in logging.getLogger().handlers
    finally:
        logging.getLogger().removeHandler(handler)
    assert cluster.global_rank({"SLURM_PROCID": "3"}) == 3
    assert cluster.global_rank({"LOCAL_RANK": "1"}) == 1
    assert cluster.global_rank({}) == 0


# --------------------------------------------------------------- launcher and sbatch
def test_slurm_launcher_config(tmp_path, monkeypatch):
    cfg = compose_config("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                   "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                                   "hydra.launcher.timeout_min=30"], tmp_path)
    launcher = instantiate(cfg.hydra.launcher)
    params = launcher.params
    assert type(launcher).__name__ == "SlurmLauncher"
    assert (params["partition"], params["nodes"], params["tasks_per_node"], params["gpus_per_node"],
            params["timeout_min"]) == ("gpu", 2, 4, 4, 30)
    assert params["additional_parameters"] == {"signal": "USR1@120", "requeue": True}

    # The sbatch file submitit would write from these parameters.
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    base = set(OmegaConf.structured(BaseQueueConf).keys())
    # Writing the sbatch text needs no SLURM, but submitit's executor refuses to start where
    # `srun` is not on PATH (a CI machine): say there is one, for this text only.
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    text = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
                 "--signal=USR1@120", "--requeue", "--time=30"):
        assert f"#SBATCH {line}\n" in text, line


def test_slurm_launcher_needs_a_partition(tmp_path):
    from omegaconf.errors import MissingMandatoryValue

    cfg = compose_config("train", ["hydra/launcher=slurm"], tmp_path)
    with pytest.raises(MissingMandatoryValue, match="partition"):
        instantiate(cfg.hydra.launcher)


def test_sbatch_file_header_has_the_commands():
    path = ROOT / "scripts" / "slurm" / "train.sbatch"
    text = path.read_text()
    header = text.split("set -euo pipefail")[0]
    assert "sbatch --partition=gpu scripts/slurm/train.sbatch" in header
    assert "sbatch --partition=gpu --nodes=2 scripts/slurm/train.sbatch" in header
    assert "scancel --signal=USR1" in header
    directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    assert {"--signal=USR1@120", "--requeue", "--ntasks-per-node=4", "--gpus-per-node=4"} <= set(directives)
    assert 'trainer.devices="${SLURM_NTASKS_PER_NODE}"' in text
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


# --------------------------------------------------------------------------- resume
def _fake_ckpt(path: Path, step: int = 0) -> Path:
    torch.save({"state_dict": {}, "global_step": step}, path)
    return path


def test_resume_path_picks_the_newest_hpc_checkpoint(tmp_path):
    assert cluster.resume_path(tmp_path, "given.ckpt", env={}) == "given.ckpt"
    for n in (2, 10, 9):
        _fake_ckpt(tmp_path / f"hpc_ckpt_{n}.ckpt")
    assert cluster.resume_path(tmp_path, None, env={}) == str(tmp_path / "hpc_ckpt_10.ckpt")
    # a requeued job with no hpc checkpoint falls back to the epoch-end last.ckpt
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    last = _fake_ckpt(run / "checkpoints" / "last.ckpt")
    assert cluster.resume_path(run, "given.ckpt", env={"SLURM_RESTART_COUNT": "1"}) == str(last)


def test_requeued_job_without_checkpoint(tmp_path):
    env = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1"}
    with pytest.raises(FileNotFoundError, match=r"job 7 was requeued .* no checkpoint to resume from"
                                                r".*resume_fresh_if_missing=true"):
        cluster.resume_path(tmp_path, None, env=env)
    assert cluster.resume_path(tmp_path, None, fresh_if_missing=True, env=env) is None


def test_requeued_job_with_corrupt_checkpoint(tmp_path):
    env = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1"}
    _fake_ckpt(tmp_path / "hpc_ckpt_1.ckpt")
    bad = tmp_path / "hpc_ckpt_2.ckpt"
    bad.write_bytes(b"half a checkpoi")
    with pytest.raises(ValueError, match=r"cannot resume SLURM job 7 .*hpc_ckpt_2.ckpt is not a readable"):
        cluster.resume_path(tmp_path, None, env=env)
    assert bad.is_file()  # nothing touched without the flag
    assert cluster.resume_path(tmp_path, None, fresh_if_missing=True, env=env) is None
    # moved out of Lightning's way (it would pick the newest hpc_ckpt_* by itself)
    assert not bad.exists() and (tmp_path / "corrupt" / "hpc_ckpt_2.ckpt").is_file()


def test_requeued_train_stops_or_starts_fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "11")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    cfg = compose_config("train", TINY + ["callbacks.forecast_plots=null"], tmp_path)
    with pytest.raises(FileNotFoundError, match="job 11 was requeued"):
        train(cfg)
    cfg = compose_config("train", TINY + ["callbacks.forecast_plots=null",
                                          "++resume_fresh_if_missing=true"], tmp_path)
    assert "val/mse" in train(cfg)


class SendSignal(L.Callback):
    """Test helper: send ``signum`` to this process before training batch ``at_step``."""

    def __init__(self, at_step: int, signum: str = "SIGUSR1") -> None:
        self.at_step, self.signum = at_step, getattr(signal, signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", ["SIGUSR1", "SIGTERM"])
def test_preemption_checkpoints_requeues_and_resumes(monkeypatch, tmp_path, signum):
    """The signal stops training after the current batch with <run>/hpc_ckpt_1.ckpt and a
    requeue; the requeued job (same folder) resumes and ends with the uninterrupted
    number of optimizer steps."""
    requeued = []
    monkeypatch.setattr(cluster, "requeue_job", lambda: requeued.append(True) or True)
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    common = TINY + ["callbacks.forecast_plots=null", "trainer.max_epochs=2", "data.train_size=32"]
    steps = 2 * 32 // 8
    first = compose_config("train", common + [
        f"+callbacks.send_signal={{_target_:tests.test_cluster.SendSignal,at_step:5,signum:{signum}}}"],
        tmp_path)
    with pytest.raises(SystemExit):
        train(first)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers restored
    run = Path(first.paths.output_dir)
    hpc = run / "hpc_ckpt_1.ckpt"
    assert requeued == [True] and hpc.is_file()
    assert torch.load(hpc, weights_only=True)["global_step"] == 6  # batch 5 (0-based) completed

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    train(compose_config("train", common, tmp_path))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps


# ---------------------------------------------------------------------- DDP, 2 ranks
def _last(metrics_csv: Path, key: str) -> float:
    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get(key)]
    return float(rows[-1][key])


def test_ddp_two_cpu_processes_reduce_metrics(tmp_path):
    """`trainer=ddp trainer.devices=2` on CPU (gloo): one run folder, each rank validates
    half of the set, and the logged val/mse equals one process validating the same
    checkpoint on the whole set."""
    env = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
    out = subprocess.run(
        [sys.executable, "train.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.precision=32-true", *TINY, "data.val_size=24", "callbacks.forecast_plots=null",
         f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path / 'data'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # not one folder per process
    run = runs[0]
    assert "global batch size 8 over 2 processes: 4 per device" in (run / "train.log").read_text()
    assert out.stderr.count("Initializing distributed: GLOBAL_RANK") == 2

    model, dm, _ = load_run(run / "checkpoints" / "last.ckpt")
    single = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False).validate(model, datamodule=dm, verbose=False)[0]
    for key in ("val/mse", "val/loss", "val/persistence/mse"):
        assert _last(run / "csv" / "metrics.csv", key) == pytest.approx(single[key], rel=1e-5), key
