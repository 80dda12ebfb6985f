"""Running on clusters: DDP world size, global batch size, SLURM preemption and resume.

What ``nowcast.train`` calls, in order:

1. :func:`log_on_rank_zero_only` - only global rank 0 writes the run's ``train.log``.
2. :func:`resume_path` - a requeued SLURM job resumes from the newest ``hpc_ckpt_N.ckpt``
   of its run folder (missing / corrupt: stop, or start again if allowed).
3. :func:`check_devices` - more devices than the node has is an error before any launch.
4. :func:`set_per_device_batch_size` - ``data.batch_size`` is the global batch size.

:class:`SlurmRequeue` (in ``configs/callbacks/default.yaml``) saves the hpc checkpoint and
requeues the job on the time-limit signal. One run folder per job, whatever the number of
ranks, comes from ``configs/hydra/default.yaml`` (``runs/<SLURM_JOB_ID>``) through the
resolvers of :mod:`nowcast.run_folders` (:func:`run_dir`, :func:`unique_time`). See ``docs/cluster.md``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from nowcast.checkpoints import load_checkpoint

log = logging.getLogger(__name__)

#: Where Lightning writes and looks for checkpoints taken before a requeue
#: (``Trainer.default_root_dir``, i.e. the run folder): ``hpc_ckpt_<N>.ckpt``.
HPC_PATTERN = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


# ------------------------------------------------------------------------------- ranks
def global_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's global rank from the launcher's environment (0 outside DDP).

    Read before the trainer exists: ``RANK`` (torchrun), ``SLURM_PROCID`` (srun),
    ``LOCAL_RANK`` (Lightning's own single-node launcher, which sets no ``RANK``).
    """
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return 0


def log_on_rank_zero_only(rank: int | None = None) -> None:
    """Close the Hydra log-file handlers on every rank but 0.

    All ranks of a job share one run folder (and so one ``train.log``); rank 0's lines are
    the run's log, the others still print to their own stderr (the SLURM ``.err`` file).
    """
    rank = global_rank() if rank is None else rank
    if rank == 0:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


# ---------------------------------------------------------------------- devices, batch
def check_devices(accelerator: str, devices: Any, num_nodes: int = 1) -> None:
    """Raise ``ValueError`` if ``devices`` asks for more devices than this node has.

    Checked before the trainer launches any process, so the message is about the config
    rather than a CUDA or process-group error. ``devices`` may be an int, a list of
    device indices, ``-1`` or ``"auto"`` (always fine).
    """
    if devices in ("auto", -1, "-1", None):
        return
    wanted = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
    if wanted < 1 or num_nodes < 1:
        raise ValueError(f"trainer.devices={devices} and trainer.num_nodes={num_nodes} must be >= 1")
    accelerator = str(accelerator)
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        have, what = torch.cuda.device_count(), "CUDA GPU(s)"
        hint = "; under SLURM ask for them with --gpus-per-node (hydra.launcher.gpus_per_node)"
    elif accelerator in ("cpu", "auto"):
        # one process per device: more processes than cores only oversubscribes the CPU
        have, what = len(os.sched_getaffinity(0)), "CPU core(s) available to this process"
        hint = "; under SLURM ask for them with --cpus-per-task / --ntasks-per-node"
    else:  # mps, tpu, ...: let Lightning check
        return
    if wanted > have:
        raise ValueError(
            f"trainer.devices={devices} (accelerator {accelerator}) asks for {wanted} devices per "
            f"node but this node has {have} {what}; use trainer.devices<={have}{hint}"
        )


def per_device_batch_size(global_batch_size: int, world_size: int) -> int:
    """``global_batch_size / world_size``; ``ValueError`` unless it divides exactly.

    ``data.batch_size`` is the global batch size: samples per optimizer step over all ranks
    (times ``trainer.accumulate_grad_batches``), so the learning rate stays right whatever
    the number of GPUs.
    """
    if global_batch_size < 1 or world_size < 1:
        raise ValueError(f"batch size {global_batch_size} and world size {world_size} must be >= 1")
    if global_batch_size % world_size:
        lower = global_batch_size // world_size * world_size
        raise ValueError(
            f"data.batch_size={global_batch_size} is the global batch size and must divide evenly "
            f"over the {world_size} processes (trainer.num_nodes x trainer.devices); use a "
            f"multiple of {world_size}, e.g. data.batch_size={max(lower, world_size)} or "
            f"{lower + world_size}"
        )
    return global_batch_size // world_size


def set_per_device_batch_size(datamodule: L.LightningDataModule, trainer: L.Trainer) -> int:
    """Turn the datamodule's global ``batch_size`` into the per-device one (returns it).

    The datamodules build every DataLoader from ``self.batch_size``, so setting the
    attribute before ``fit`` is enough. World size = ``num_nodes x num_devices``: known
    right after ``Trainer(...)``, before any process is launched.
    """
    world = trainer.num_nodes * trainer.num_devices
    size = per_device_batch_size(int(datamodule.batch_size), world)
    if world > 1:
        log.info("global batch size %d over %d processes: %d per device",
                 datamodule.batch_size, world, size)
    datamodule.batch_size = size
    return size


# ------------------------------------------------------------------------------ resume
def hpc_checkpoints(run_dir: str | Path) -> list[Path]:
    """``hpc_ckpt_<N>.ckpt`` files in ``run_dir``, oldest (lowest N) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := HPC_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def resume_path(
    run_dir: str | Path,
    ckpt_path: str | None,
    fresh_if_missing: bool = False,
    env: Mapping[str, str] = os.environ,
) -> str | None:
    """The checkpoint ``trainer.fit`` should resume from.

    A run with no ``hpc_ckpt_*.ckpt`` in its folder that is not a requeued SLURM job
    (``SLURM_RESTART_COUNT`` unset or 0) keeps ``ckpt_path`` as configured. Otherwise it
    resumes from, in order: the newest ``hpc_ckpt_<N>.ckpt`` (saved on preemption), then
    ``checkpoints/last.ckpt`` (end of the last epoch), then ``ckpt_path``.

    Raises
    ------
    FileNotFoundError
        A requeued job finds none of them, and ``fresh_if_missing`` is false.
    ValueError
        The checkpoint to resume from is unreadable, and ``fresh_if_missing`` is false.
        With ``fresh_if_missing`` the unreadable file is moved to ``<run>/corrupt/`` (so
        that Lightning does not pick it up either) and the run starts from ``ckpt_path``.
    """
    run_dir = Path(run_dir)
    restarts = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    hpc = hpc_checkpoints(run_dir)
    if not hpc and restarts == 0:
        return ckpt_path
    job = env.get("SLURM_JOB_ID", "?")
    last = run_dir / "checkpoints" / "last.ckpt"
    candidate = hpc[-1] if hpc else last if last.is_file() else ckpt_path
    allow = "set ++resume_fresh_if_missing=true to start this run again from ckpt_path"
    if candidate is None:
        message = (
            f"SLURM job {job} was requeued (SLURM_RESTART_COUNT={restarts}) but its run folder "
            f"{run_dir} holds no checkpoint to resume from (no hpc_ckpt_*.ckpt, no "
            f"checkpoints/last.ckpt): the job was stopped before it saved one"
        )
        if not fresh_if_missing:
            raise FileNotFoundError(f"{message}; {allow} (null: from scratch)")
        log.warning("%s; starting again from scratch (resume_fresh_if_missing=true)", message)
        return None
    try:
        load_checkpoint(candidate)
    except (FileNotFoundError, ValueError) as err:
        if not fresh_if_missing:
            raise type(err)(
                f"cannot resume SLURM job {job} (restart {restarts}): {err}; {allow}, or point "
                "ckpt_path at another checkpoint of the run"
            ) from err
        log.warning("cannot resume from %s (%s); starting again from ckpt_path=%s "
                    "(resume_fresh_if_missing=true)", candidate, err, ckpt_path)
        if candidate in hpc:
            _move_aside(Path(candidate))
        return ckpt_path
    log.info("SLURM job %s (restart %d): resuming from %s", job, restarts, candidate)
    return str(candidate)


def _move_aside(path: Path, timeout_s: float = 120.0) -> None:
    """Rank 0 moves ``path`` to ``<run>/corrupt/``; the other ranks wait until it is gone.

    Lightning resumes from the newest ``hpc_ckpt_*.ckpt`` by itself under SLURM when
    ``fit`` gets no ``ckpt_path``: the unreadable file must leave the run folder first.
    """
    if global_rank() == 0:
        target = path.parent / "corrupt" / path.name
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        log.warning("moved the unreadable %s to %s", path.name, target)
        return
    deadline = time.monotonic() + timeout_s
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.5)


# ---------------------------------------------------------------------- preemption
class SlurmRequeue(L.Callback):
    """Save ``<run>/hpc_ckpt_<N>.ckpt`` and requeue the SLURM job on a stop signal.

    SLURM sends ``requeue_signal`` ahead of the time limit when the job asks for it
    (``sbatch --signal=USR1@120``; ``hydra.launcher.signal_delay_s``) and ``SIGTERM`` on
    preemption or at the limit. The handler only records the signal; at the end of the
    current training batch all ranks agree (one all-reduce of a flag per batch), save the
    checkpoint together, rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` and every rank
    exits. The requeued job keeps its job id, hence its run folder, and
    :func:`resume_path` resumes from the checkpoint.

    This replaces Lightning's own handlers during training: its auto-requeue saves the
    checkpoint - a collective - inside the signal handler, where it can interleave with
    DDP's gradient all-reduce on other ranks, and on ``SIGTERM`` it saves nothing.
    Outside SLURM the callback does nothing.

    Parameters
    ----------
    requeue_signal
        Name of the time-limit signal (``"USR1"``); ``SIGTERM`` is always handled.
    requeue
        Call ``scontrol requeue`` after saving (false: save and exit only).
    """

    def __init__(self, requeue_signal: str = "USR1", requeue: bool = True) -> None:
        self.signals = [getattr(signal, f"SIG{requeue_signal.upper().removeprefix('SIG')}"),
                        signal.SIGTERM]
        self.requeue = requeue
        self.received: int | None = None
        self.saved_path: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def active(self) -> bool:
        return "SLURM_JOB_ID" in os.environ

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum  # acted on at the next batch boundary, on every rank together

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning has installed its own handlers (its auto-requeue on USR1, its
        # SIGTERM notifier): ours replace them until `teardown` puts them back.
        if not self.active:
            return
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.active:
            return
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            self._save_and_requeue(trainer)
            raise SystemExit(0)  # not an error: submitit and Hydra then write no failure

    def _save_and_requeue(self, trainer: L.Trainer) -> None:
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        path = trainer.strategy.broadcast(path)  # same N on every rank
        trainer.save_checkpoint(path)
        self.saved_path = path
        name = signal.Signals(self.received).name if self.received else "?"
        log.warning("%s at global step %d: saved %s", name, trainer.global_step, path)
        if self.requeue and trainer.is_global_zero:
            requeue_job()


def requeue_job(env: Mapping[str, str] = os.environ) -> bool:
    """``scontrol requeue`` this job (array task aware); False, with a warning, on failure."""
    job = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return False
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not requeue SLURM job %s: %s", job, err)
        return False
    if out.returncode:
        # e.g. the job was cancelled (scancel): nothing to requeue, the checkpoint stays
        log.warning("scontrol requeue %s failed: %s", job, (out.stderr or out.stdout).strip())
        return False
    log.warning("requeued SLURM job %s; it resumes from the checkpoint when it restarts", job)
    return True
