"""Atomic writes: a full disk (mocked ENOSPC) never leaves a truncated file in place."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch

from nowcast.checkpoints import load_checkpoint
from nowcast.io_utils import DiskFullError, atomic_write_text, save_figure
from nowcast.train import train
from tests.conftest import TINY, compose_config


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_text_keeps_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "out" / "metrics.json"
    atomic_write_text(path, '{"old": 1}')
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(DiskFullError, match=rf"no space left in {path.parent} to write metrics.json "
                                            r"\(.* MB free; it needs about"):
        atomic_write_text(path, '{"new": 2}')
    assert path.read_text() == '{"old": 1}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no temp file left


def test_plot_on_a_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = tmp_path / "plots" / "scores.png"
    save_figure(fig, path, dpi=50)
    before = path.read_bytes()
    assert before[:4] == b"\x89PNG"
    real_fdopen = os.fdopen

    class FillsUp:
        """A file on a disk that fills up in the middle of the write."""

        def __init__(self, *args, **kwargs):
            self.file = real_fdopen(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(data[: len(data) // 2])
            self.file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", FillsUp)
    with pytest.raises(DiskFullError, match=f"no space left in {path.parent}") as info:
        save_figure(fig, path, dpi=50)
    plt.close(fig)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback
    assert path.read_bytes() == before


def test_full_disk_while_checkpointing_keeps_the_previous_last_ckpt(tmp_path, monkeypatch):
    common = TINY + ["callbacks.forecast_plots=null"]
    cfg = compose_config("train", common, tmp_path)
    train(cfg)
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    last = ckpts / "last.ckpt"
    before = last.read_bytes()

    real_save = torch.save

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # what a full disk leaves: part of the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    resumed = compose_config("train", common + [f"ckpt_path={last}", "trainer.max_epochs=2"], tmp_path)
    with pytest.raises(DiskFullError, match=rf"no space left in {ckpts} to write (last|best).ckpt .*"
                                            r"needs about [\d.]+ MB\); the previous"):
        train(resumed)
    monkeypatch.undo()
    assert last.read_bytes() == before
    assert load_checkpoint(last)["epoch"] == 0  # still the loadable end of epoch 0
    assert not [p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")]


def test_real_full_tmpfs(tmp_path):
    """The same on a real 1 MB tmpfs, where the system allows mounting one (root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        path = mount / "last.ckpt"
        atomic_write_text(path, "old")
        with pytest.raises(DiskFullError, match=f"no space left in {mount}"):
            atomic_write_text(path, "x" * 2_000_000)
        assert path.read_text() == "old"
        assert os.listdir(mount) == ["last.ckpt"]
    finally:
        subprocess.run(["umount", str(mount)], check=False)
