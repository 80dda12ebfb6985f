"""Radar rainfall archives as sliding windows of past and future frames.

Data contract (``docs/data_contract.md``): a sample is one window of
``T = input_steps + output_steps`` consecutive frames at the archive's native time step,

- ``inputs``  float32 ``(T_in, 1, H, W)``: ``transform.encode(rain rate in mm/h)``;
  missing pixels (NaN, ``_FillValue``, outside coverage, padding) hold ``encode(0)``;
- ``targets`` float32 ``(T_out, 1, H, W)``: the same for the next ``T_out`` frames;
- ``mask``    bool    ``(T_out, 1, H, W)``: ``True`` where the target is a valid value;
- ``issue_time`` int64 ``()``: ns since 1970-01-01 UTC of the last input frame,

batched by the default collate to ``(B, ...)``. Physical values are rain rate in mm/h
(accumulations are divided by their period, reflectivity converted with ``Z = a R^b``);
normalisation happens only in ``transform.encode`` and ``transform.decode`` undoes it.
``(H, W)`` is the grid after ``downsample`` (block mean), cropped to ``crop_size`` for
training, and padded (masked) up to a multiple of ``pad_multiple`` otherwise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from nowcast.data.radar_io import RadarArchive, RadarDataError, RadarGrid
from nowcast.data.transforms import LogRainRate, Transform

log = logging.getLogger(__name__)

Period = Sequence[str] | None


def _parse_period(name: str, period: Period) -> tuple[np.datetime64, np.datetime64] | None:
    if period is None:
        return None
    values = list(period)
    if len(values) != 2:
        raise ValueError(f"{name} must be [start, end] (ISO times), got {period!r}")
    try:
        start, end = (np.datetime64(str(v), "ns") for v in values)
    except ValueError as error:
        raise ValueError(f"{name}: cannot parse {period!r} as ISO times: {error}") from error
    if end < start:
        raise ValueError(f"{name}: end {values[1]} is before start {values[0]}")
    return start, end


def window_starts(
    times: np.ndarray,
    step: np.timedelta64,
    length: int,
    in_split: np.ndarray,
    stride: int = 1,
) -> tuple[np.ndarray, int]:
    """First-frame indices of the windows that lie in one split.

    Parameters
    ----------
    times
        ``(N,)`` sorted frame times, datetime64.
    step
        Native time step; a window whose consecutive frames are not ``step`` apart spans
        a gap and is dropped.
    length
        Frames per window, ``T_in + T_out``.
    in_split
        ``(N,)`` bool, frames of the split; a window needs all of its frames in it.
    stride
        Keep every ``stride``-th window of each run of consecutive valid windows.

    Returns
    -------
    ``(starts, dropped)``: int64 ``(M,)`` start indices, and how many windows inside
    the split were dropped because they span a gap.
    """
    n = len(times)
    if n < length:
        return np.zeros(0, dtype=np.int64), 0
    s = np.arange(n - length + 1)
    cs_in = np.concatenate([[0], np.cumsum(in_split)])
    cs_ok = np.concatenate([[0], np.cumsum(np.diff(times) == step)])
    inside = cs_in[s + length] - cs_in[s] == length
    contiguous = cs_ok[s + length - 1] - cs_ok[s] == length - 1
    starts = s[inside & contiguous]
    if stride > 1 and starts.size:
        run = np.cumsum(np.r_[True, np.diff(starts) != 1]) - 1  # run id of each start
        run_first = starts[np.r_[True, np.diff(starts) != 1]]
        starts = starts[(starts - run_first[run]) % stride == 0]
    return starts.astype(np.int64), int(np.sum(inside & ~contiguous))


class RadarWindowDataset(Dataset):
    """Windows of an archive, read lazily; see the module docstring for the sample layout.

    Parameters
    ----------
    archive
        The frames (mm/h, NaN missing), read on demand.
    starts
        First-frame index of every window, ``(M,)``.
    input_steps, output_steps
        ``T_in`` and ``T_out``.
    transform
        mm/h -> network space.
    crop_size
        ``(h, w)`` of a random crop (training), or ``None`` for the full domain.
    pad_multiple
        Pad ``H`` and ``W`` (bottom/right) to a multiple of this; padding is masked.
    augment
        Random rotation by a multiple of 90 degrees and random flip of each window
        (training): rain fields move in every direction, one day of data does not.
    """

    def __init__(
        self,
        archive: RadarArchive,
        starts: np.ndarray,
        input_steps: int,
        output_steps: int,
        transform: Transform,
        crop_size: tuple[int, int] | None = None,
        pad_multiple: int = 1,
        augment: bool = False,
    ) -> None:
        self.archive = archive
        self.starts = np.asarray(starts, dtype=np.int64)
        self.input_steps = input_steps
        self.output_steps = output_steps
        self.transform = transform
        self.crop_size = crop_size
        self.pad_multiple = pad_multiple
        self.augment = augment
        self._issue_ns = archive.times.astype("datetime64[ns]").astype(np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def issue_times(self) -> np.ndarray:
        """``(M,)`` datetime64 issue time (last input frame) of every window."""
        return self.archive.times[self.starts + self.input_steps - 1]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = int(self.starts[index])
        length = self.input_steps + self.output_steps
        frames = self.archive.read(range(s, s + length))  # (T, H, W) mm/h, NaN missing
        if self.crop_size is not None:
            ch, cw = self.crop_size
            top = int(torch.randint(0, frames.shape[1] - ch + 1, ()))
            left = int(torch.randint(0, frames.shape[2] - cw + 1, ()))
            frames = frames[:, top : top + ch, left : left + cw]  # (T, ch, cw)
        if self.augment:
            square = frames.shape[1] == frames.shape[2]
            k = int(torch.randint(0, 4, ())) if square else 2 * int(torch.randint(0, 2, ()))
            frames = np.rot90(frames, k, axes=(1, 2))  # (T, H, W) or (T, W, H)
            if int(torch.randint(0, 2, ())):
                frames = frames[:, :, ::-1]
            frames = np.ascontiguousarray(frames)
        valid = torch.from_numpy(np.isfinite(frames))  # (T, H, W) bool
        rain = torch.from_numpy(np.nan_to_num(frames, nan=0.0))  # missing -> 0 mm/h
        x = self.transform.encode(rain).float()  # (T, H, W) network space
        h, w = x.shape[-2:]
        m = self.pad_multiple
        pad_h, pad_w = -h % m, -w % m
        if pad_h or pad_w:
            fill = float(self.transform.encode(torch.zeros(())))
            x = F.pad(x, (0, pad_w, 0, pad_h), value=fill)  # (T, H+ph, W+pw)
            valid = F.pad(valid, (0, pad_w, 0, pad_h), value=False)
        x = x.unsqueeze(1)  # (T, 1, H, W)
        t_in = self.input_steps
        return {
            "inputs": x[:t_in].contiguous(),  # (T_in, 1, H, W)
            "targets": x[t_in:].contiguous(),  # (T_out, 1, H, W)
            "mask": valid[t_in:].unsqueeze(1).contiguous(),  # (T_out, 1, H, W)
            "issue_time": torch.tensor(self._issue_ns[s + t_in - 1], dtype=torch.int64),
        }


class RadarDataModule(L.LightningDataModule):
    """Radar rainfall nowcasting windows from a netCDF archive, streamed lazily.

    A batch is a dict (``docs/data_contract.md``): ``inputs`` float32
    ``(B, T_in, 1, H, W)`` and ``targets`` float32 ``(B, T_out, 1, H, W)`` in network
    space (``transform.encode`` of rain rate in mm/h, missing inputs filled with
    ``encode(0)``), ``mask`` bool ``(B, T_out, 1, H, W)`` (``False`` for missing or
    padded target pixels) and ``issue_time`` int64 ``(B,)`` (ns since 1970-01-01 UTC of
    the last input frame). Scores are computed on ``transform.decode(...)`` in mm/h.

    Parameters
    ----------
    path
        Directory, glob pattern, file or list of files: one file per time step (time
        from ``time_variable`` or from the file name with ``filename_time_format``), or
        files with a time dimension (such as ``scripts/prepare_radar.py`` writes).
    variable
        Precipitation variable; ``None``: found by CF ``standard_name``
        (``rainfall_rate``, ``precipitation_amount``, ``equivalent_reflectivity_factor``).
    time_variable
        Scalar time variable of per-time-step files (BoM ``valid_time``).
    filename_time_format
        ``strftime`` format of the time in file names, e.g. ``"%Y%m%d_%H%M%S"``; the
        files are then not opened until read. ``filename_time_regex`` (one group)
        overrides the regex built from it.
    units
        Units of ``variable``, overriding the file attribute: ``"mm/h"``, ``"mm s-1"``,
        ``"mm"``/``"kg m-2"`` (accumulation), ``"dBZ"``.
    accumulation_minutes
        Period of an accumulation; ``None``: the archive's time step (rate = value *
        60 / minutes, mm/h).
    zr_a, zr_b
        ``Z = a R^b`` for dBZ input (Marshall-Palmer 200, 1.6; HKO 58.53, 1.56).
    transform
        mm/h <-> network space; default :class:`~nowcast.data.transforms.LogRainRate`.
    input_steps, output_steps
        ``T_in`` past frames (the last one is the issue time) and ``T_out`` leads.
    train_period, val_period, test_period
        ``[start, end]`` ISO times, inclusive, of the FRAMES of a split; a window
        belongs to a split only if all its frames do. ``train_period=None``: every frame
        outside the val and test periods. ``val_period=None``: no validation;
        ``test_period=None``: ``trainer.test`` raises.
    window_stride
        Keep every n-th training/validation window (1: all, overlapping by T-1 frames).
    test_window_stride
        The same for val and test windows; ``None``: ``window_stride``.
    min_wet_fraction, wet_threshold
        Training windows whose fraction of valid pixels >= ``wet_threshold`` mm/h (over
        all T frames, on the downsampled grid) is below ``min_wet_fraction`` are
        dropped; 0 keeps all. Costs one read of every training frame at ``setup``.
    downsample
        Block-mean factor (NaN-aware); 2 turns the BoM 512x512 0.5 km grid into 256x256 at 1 km.
    crop_size
        Random training crops, int or ``[h, w]`` on the downsampled grid; ``None``: full
        domain. Validation and test always see the full domain.
    pad_multiple
        Pad full-domain frames (bottom/right, masked) to a multiple of this, e.g. the
        total spatial stride of the network.
    augment
        Randomly rotate (multiples of 90 degrees) and flip training windows.
    batch_size, num_workers
        DataLoader settings; each worker opens its own file handles.
    multiprocessing_context
        How DataLoader workers start: ``"spawn"`` (default) or ``"forkserver"`` give each
        worker a clean process that receives the dataset pickled, without the parent's
        open files; ``"fork"`` is faster to start but netCDF4/HDF5 are not fork-safe: a
        worker reading through the library state copied from a parent with open files
        can crash (seen as a segfault in a test run).
    skip_bad_files
        Warn about and leave out unreadable files instead of raising.
    chunks
        Dask chunks for files with a time dimension, e.g. ``{"time": 1}``; ``None``
        reads lazily without dask.
    time_step
        Native step, e.g. ``"10min"``; ``None`` infers the most common spacing.

    Attributes
    ----------
    transform, num_leads, lead_times (``["10min", ...]``), grid (:class:`RadarGrid`),
    frame_shape (padded ``(H, W)`` of val/test frames), archive (:class:`RadarArchive`).
    """

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        variable: str | None = None,
        time_variable: str = "valid_time",
        filename_time_format: str | None = None,
        units: str | None = None,
        accumulation_minutes: float | None = None,
        zr_a: float = 200.0,
        zr_b: float = 1.6,
        transform: Transform | None = None,
        input_steps: int = 4,
        output_steps: int = 6,
        train_period: Period = None,
        val_period: Period = None,
        test_period: Period = None,
        window_stride: int = 1,
        test_window_stride: int | None = None,
        min_wet_fraction: float = 0.0,
        wet_threshold: float = 0.1,
        downsample: int = 1,
        crop_size: int | Sequence[int] | None = None,
        pad_multiple: int = 1,
        augment: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        multiprocessing_context: str | None = "spawn",
        skip_bad_files: bool = False,
        chunks: dict | int | str | None = None,
        filename_time_regex: str | None = None,
        time_step: str | None = None,
    ) -> None:
        super().__init__()
        if input_steps < 1 or output_steps < 1:
            raise ValueError(f"input_steps and output_steps must be >= 1, got {input_steps}, {output_steps}")
        if window_stride < 1 or (test_window_stride is not None and test_window_stride < 1):
            raise ValueError("window strides must be >= 1")
        if not 0.0 <= min_wet_fraction <= 1.0:
            raise ValueError(f"min_wet_fraction must be in [0, 1], got {min_wet_fraction}")
        self.path = path if isinstance(path, (str, Path)) else [str(p) for p in path]
        self.transform = transform if transform is not None else LogRainRate()
        self.input_steps = int(input_steps)
        self.output_steps = int(output_steps)
        self.periods = {
            "train": _parse_period("train_period", train_period),
            "val": _parse_period("val_period", val_period),
            "test": _parse_period("test_period", test_period),
        }
        self.window_stride = int(window_stride)
        self.test_window_stride = int(test_window_stride or window_stride)
        self.min_wet_fraction = float(min_wet_fraction)
        self.wet_threshold = float(wet_threshold)
        if crop_size is not None:
            crop_size = (int(crop_size),) * 2 if isinstance(crop_size, int) else tuple(int(c) for c in crop_size)
        self.crop_size: tuple[int, int] | None = crop_size  # type: ignore[assignment]
        self.pad_multiple = int(pad_multiple)
        self.augment = bool(augment)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.multiprocessing_context = multiprocessing_context
        self._archive_args = dict(
            variable=variable, time_variable=time_variable,
            filename_time_format=filename_time_format, filename_time_regex=filename_time_regex,
            units=units, accumulation_minutes=accumulation_minutes, zr_a=zr_a, zr_b=zr_b,
            downsample=downsample, skip_bad_files=skip_bad_files,
            chunks=dict(chunks) if isinstance(chunks, Mapping) else chunks,  # DictConfig -> dict
            time_step=time_step,
            # A window's worth of decoded frames: sliding windows read each frame once.
            cache_frames=self.input_steps + self.output_steps,
        )
        self._archive: RadarArchive | None = None
        self._datasets: dict[str, RadarWindowDataset] = {}

    # ------------------------------------------------------------------ attributes
    @property
    def archive(self) -> RadarArchive:
        """The scanned archive (scanned on first use)."""
        if self._archive is None:
            self._archive = RadarArchive(self.path, **self._archive_args)  # type: ignore[arg-type]
        return self._archive

    @property
    def num_leads(self) -> int:
        """``T_out``, the number of lead times."""
        return self.output_steps

    @property
    def lead_times(self) -> list[str]:
        """Lead time of every target frame, e.g. ``["10min", ..., "60min"]``."""
        minutes = self.archive.step / np.timedelta64(1, "m")
        return [f"{minutes * (k + 1):g}min" for k in range(self.output_steps)]

    @property
    def grid(self) -> RadarGrid:
        """Coordinates of the (downsampled) full-domain grid, with ``padded_shape``."""
        return self.archive.grid(self.pad_multiple)

    @property
    def frame_shape(self) -> tuple[int, int]:
        """``(H, W)`` of validation/test frames, after downsampling and padding."""
        return self.grid.padded_shape  # type: ignore[return-value]

    # ------------------------------------------------------------------ splits
    def _in_period(self, period: tuple[np.datetime64, np.datetime64]) -> np.ndarray:
        times = self.archive.times
        return (times >= period[0]) & (times <= period[1])

    def _split_frames(self, split: str) -> np.ndarray:
        """``(N,)`` bool: the frames of ``split``."""
        period = self.periods[split]
        if split == "train" and period is None:
            held_out = np.zeros(len(self.archive), dtype=bool)
            for other in ("val", "test"):
                if self.periods[other] is not None:
                    held_out |= self._in_period(self.periods[other])
            return ~held_out
        if period is None:
            raise RadarDataError(f"no {split}_period configured")
        frames = self._in_period(period)
        if not frames.any():
            times = self.archive.times
            raise RadarDataError(
                f"{split}_period [{period[0]}, {period[1]}] selects no frame; the archive "
                f"{self.path} spans {times[0]} .. {times[-1]}"
            )
        return frames

    def _build(self, split: str) -> RadarWindowDataset:
        archive = self.archive
        length = self.input_steps + self.output_steps
        if len(archive) < length:
            raise RadarDataError(
                f"the radar archive {self.path} has {len(archive)} frames, fewer than one "
                f"window of input_steps + output_steps = {length}"
            )
        frames = self._split_frames(split)
        stride = self.window_stride if split == "train" else self.test_window_stride
        starts, gaps = window_starts(archive.times, archive.step, length, frames, stride)
        if gaps:
            log.info("%s: dropped %d windows that span a gap in the time axis", split, gaps)
        if starts.size == 0:
            raise RadarDataError(
                f"{split}: no window of {length} consecutive frames "
                f"({archive.step / np.timedelta64(1, 'm'):g} min apart) "
                f"lies inside the split ({int(frames.sum())} frames, "
                f"{split}_period={self.periods[split]}); too few frames"
            )
        if split == "train":
            for other in ("val", "test"):
                if self.periods["train"] is not None and self.periods[other] is not None:
                    if (self._in_period(self.periods["train"]) & self._in_period(self.periods[other])).any():
                        log.warning("train_period overlaps %s_period", other)
            if self.min_wet_fraction > 0:
                starts = self._drop_dry(starts, length)
        crop = self.crop_size if split == "train" else None
        if crop is not None and (crop[0] > archive.shape[0] or crop[1] > archive.shape[1]):
            raise ValueError(f"crop_size {crop} is larger than the grid {archive.shape}")
        log.info(
            "%s: %d windows, issue times %s .. %s", split, len(starts),
            archive.times[starts[0] + self.input_steps - 1] if len(starts) else None,
            archive.times[starts[-1] + self.input_steps - 1] if len(starts) else None,
        )
        return RadarWindowDataset(
            archive, starts, self.input_steps, self.output_steps, self.transform,
            crop_size=crop, pad_multiple=1 if crop is not None else self.pad_multiple,
            augment=self.augment and split == "train",
        )

    def _drop_dry(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Keep windows whose wet fraction is >= ``min_wet_fraction`` (one pass over frames)."""
        t0 = time.perf_counter()
        needed = np.zeros(len(self.archive), dtype=bool)
        for offset in range(length):
            needed[starts + offset] = True
        wet = np.zeros(len(self.archive))
        valid = np.zeros(len(self.archive))
        idx = np.flatnonzero(needed)
        for chunk in np.array_split(idx, max(1, len(idx) // 32)):
            frames = self.archive.read(chunk, cache=False)  # (n, H, W) mm/h
            wet[chunk] = (frames >= self.wet_threshold).sum(axis=(1, 2))  # NaN >= x is False
            valid[chunk] = np.isfinite(frames).sum(axis=(1, 2))
        cs_wet = np.concatenate([[0.0], np.cumsum(wet)])
        cs_valid = np.concatenate([[0.0], np.cumsum(valid)])
        fraction = (cs_wet[starts + length] - cs_wet[starts]) / np.maximum(
            cs_valid[starts + length] - cs_valid[starts], 1.0
        )
        kept = starts[fraction >= self.min_wet_fraction]
        log.info(
            "train: dry filter (>= %.3g of pixels >= %g mm/h) kept %d of %d windows (%.1f s)",
            self.min_wet_fraction, self.wet_threshold, len(kept), len(starts),
            time.perf_counter() - t0,
        )
        if kept.size == 0:
            raise RadarDataError(
                f"train: no window has a wet fraction >= {self.min_wet_fraction} "
                f"(wet_threshold {self.wet_threshold} mm/h); lower min_wet_fraction"
            )
        return kept

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Scan the archive and build the window index of the splits ``stage`` needs."""
        wanted = {
            "fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"],
            None: ["train", "val", "test"],
        }[stage]
        for split in wanted:
            if split in self._datasets:
                continue
            if split == "val" and self.periods["val"] is None and stage in ("fit", None):
                log.warning("no val_period: training runs without validation")
                continue
            if split == "test" and self.periods["test"] is None and stage is None:
                continue
            self._datasets[split] = self._build(split)

    def dataset(self, split: str) -> RadarWindowDataset:
        """The window dataset of ``"train"``, ``"val"`` or ``"test"`` (built on demand)."""
        if split not in self._datasets:
            self._datasets[split] = self._build(split)
        return self._datasets[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            multiprocessing_context=self.multiprocessing_context if self.num_workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.periods["val"] is None:
            return []
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def teardown(self, stage: str | None = None) -> None:
        if self._archive is not None:
            self._archive.close()
