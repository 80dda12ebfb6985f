"""Writing files so that a crash or a full disk never leaves half a file behind.

Every file ``nowcast`` writes for a person or a later run (checkpoints, metrics, plots) goes
through :func:`atomic_open`: the bytes go to a temporary file in the destination's own
folder (same file system, so the final rename is atomic), are flushed and ``fsync``-ed,
and only then renamed over the destination. A reader sees the old file or the new one,
never a truncated one. A full disk (``ENOSPC``, ``EDQUOT``) becomes :class:`DiskFullError`,
which names the folder, the free space and, when known, the space needed; the temporary
file is removed and the previous file is left as it was.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

#: errno values that mean "no space left" (disk full or quota exceeded).
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(OSError):
    """Not enough space to write a file; the previous version of the file is untouched."""


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def disk_full_error(path: Path, err: OSError, needed: int | None = None) -> DiskFullError:
    """A :class:`DiskFullError` for ``path`` that says where and how much space is missing."""
    folder = path.parent
    try:
        free = _mb(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown"
    need = f"; it needs about {_mb(needed)}" if needed else ""
    return DiskFullError(
        err.errno,
        f"no space left in {folder} to write {path.name} ({free} free{need}); the previous "
        f"{path.name}, if any, is unchanged. Free some space in {folder} (or point the run "
        "elsewhere) and run again",
    )


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", needed: int | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success rename it over ``path``.

    Parameters
    ----------
    path
        Destination. Its folder is created if missing.
    mode
        ``"wb"`` or ``"w"`` (text, UTF-8).
    needed
        Expected size in bytes, only for the message of a full disk.

    Raises
    ------
    DiskFullError
        The disk or quota is full; nothing is left at ``path`` but what was there before.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        if err.errno in NO_SPACE:
            raise disk_full_error(path, err, needed) from None  # the library's own traceback adds nothing
        raise
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a library that writes files itself (netCDF,
    ONNX): renamed over ``path`` if the block succeeds, removed if it fails, so readers
    see the old file or the whole new one. A full disk raises :class:`DiskFullError`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix + ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        if err.errno in NO_SPACE:
            raise disk_full_error(path, err) from None
        raise
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


def _remove(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_open(path, "w", needed=len(text.encode())) as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_open(path, "wb", needed=len(data)) as f:
        f.write(data)
    return Path(path)


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """``fig.savefig`` to ``path`` atomically.

    The image is rendered in memory first, so a full disk is one clear
    :class:`DiskFullError` instead of an image library's traceback from inside its writer.
    """
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=kwargs.pop("format", path.suffix.lstrip(".") or "png"), **kwargs)
    return atomic_write_bytes(path, buf.getvalue())


def _nbytes(obj: Any) -> int:
    """Bytes held by the tensors in a (nested) checkpoint dict: the size a save needs."""
    import torch

    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes ``<name>.ckpt`` atomically in its own folder.

    Lightning's default writes through an fsspec transaction, whose temporary file lives
    in the system temp folder and is *copied* into place: a full disk or a crash during the
    copy leaves a truncated ``last.ckpt`` where resume and SLURM requeue look. Here the
    checkpoint is written to a temporary file beside the destination, fsync-ed and renamed
    over it; on a full disk training stops with :class:`DiskFullError` and the previous
    checkpoint stays loadable. Local paths only (remote URLs go to Lightning's default).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path):  # remote file systems: no local rename to rely on
            return super().save_checkpoint(checkpoint, path, storage_options)
        import torch

        with atomic_open(path, "wb", needed=_nbytes(checkpoint)) as f:
            torch.save(checkpoint, f)
        return None
