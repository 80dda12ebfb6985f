"""Radar rainfall archives as sliding windows of past and future frames.

Data contract (``docs/data_contract.md``): a sample is one window of
``T = input_steps + output_steps`` frames ``time_step`` apart, from one archive,

- ``inputs``  float32 ``(T_in, 1, H, W)``: ``transform.encode(rain rate in mm/h)``;
  missing pixels (NaN, ``_FillValue``, outside coverage, implausible, padding) hold
  ``encode(0)``;
- ``targets`` float32 ``(T_out, 1, H, W)``: the same for the next ``T_out`` frames;
- ``mask``    bool    ``(T_out, 1, H, W)``: ``True`` where the target is a valid value;
- ``issue_time`` int64 ``()``: ns since 1970-01-01 UTC of the last input frame,

batched by the default collate to ``(B, ...)``. Physical values are rain rate in mm/h
(accumulations are divided by their period, reflectivity converted with ``Z = a R^b``);
normalisation happens only in ``transform.encode`` and ``transform.decode`` undoes it.
``(H, W)`` is the grid after ``downsample`` (block mean), cropped to ``crop_size`` for
training, and padded (masked) up to a multiple of ``pad_multiple`` otherwise. With
several archives, a training batch mixes archives (crops of one size); a validation or
test batch holds windows of one archive only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset, WeightedRandomSampler

from nowcast.data.archives import (
    SPLITS,
    Periods,
    PeriodSpec,
    RadarSource,
    format_period,
    parse_periods,
)
from nowcast.data.radar_io import (
    DEFAULT_DBZ_RANGE,
    DEFAULT_MAX_RAIN_RATE,
    RadarArchive,
    RadarDataError,
    RadarGrid,
    _to_timedelta,
)
from nowcast.data.transforms import LogRainRate, Transform

log = logging.getLogger(__name__)

Period = PeriodSpec


def _stride(starts: np.ndarray, stride: int) -> np.ndarray:
    """Every ``stride``-th start of each run of consecutive start indices."""
    if stride > 1 and starts.size:
        new_run = np.r_[True, np.diff(starts) != 1]
        run = np.cumsum(new_run) - 1  # run id of each start
        starts = starts[(starts - starts[new_run][run]) % stride == 0]
    return starts


def window_indices(
    times: np.ndarray,
    step: np.timedelta64,
    length: int,
    in_split: np.ndarray,
    stride: int = 1,
) -> tuple[np.ndarray, int]:
    """Frame indices of every window ``length`` frames ``step`` apart inside one split.

    ``step`` may be a multiple of the archive's own spacing: a 5-minute archive at a
    10-minute step gives windows at every phase (00, 10, 20, ... and 05, 15, 25, ...).

    Parameters
    ----------
    times
        ``(N,)`` sorted frame times, datetime64[ns].
    step
        Time between the frames of a window.
    length
        Frames per window, ``T_in + T_out``.
    in_split
        ``(N,)`` bool, frames of the split; a window needs all of its frames in it.
    stride
        Keep every ``stride``-th window of each run of consecutive window starts.

    Returns
    -------
    ``(windows, dropped)``: int64 ``(M, length)`` frame indices, and how many windows
    starting inside the split were dropped because a frame is missing (a gap).
    """
    n = len(times)
    if n == 0:
        return np.zeros((0, length), dtype=np.int64), 0
    target = times[:, None] + np.arange(length) * step  # (N, L) wanted frame times
    idx = np.minimum(np.searchsorted(times, target), n - 1)  # (N, L)
    exists = times[idx] == target
    inside = exists & in_split[idx]
    full = inside.all(axis=1)
    # windows that would lie in the split and end before the last frame, but miss a frame
    gap = ~full & in_split & (target[:, -1] <= times[-1]) & (inside | ~exists).all(axis=1)
    starts = _stride(np.flatnonzero(full), stride)
    return idx[starts].astype(np.int64), int(gap.sum())


class RadarWindowDataset(Dataset):
    """Windows of an archive, read lazily; see the module docstring for the sample layout.

    Parameters
    ----------
    archive
        The frames (mm/h, NaN missing), read on demand.
    windows
        Frame indices of every window, ``(M, T_in + T_out)``; or ``(M,)`` first-frame
        indices of windows of consecutive frames.
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
        windows: np.ndarray,
        input_steps: int,
        output_steps: int,
        transform: Transform,
        crop_size: tuple[int, int] | None = None,
        pad_multiple: int = 1,
        augment: bool = False,
    ) -> None:
        self.archive = archive
        windows = np.asarray(windows, dtype=np.int64)
        if windows.ndim == 1:  # first-frame indices of consecutive frames
            windows = windows[:, None] + np.arange(input_steps + output_steps)
        self.windows = windows  # (M, T)
        self.input_steps = input_steps
        self.output_steps = output_steps
        self.transform = transform
        self.crop_size = crop_size
        self.pad_multiple = pad_multiple
        self.augment = augment
        self._issue_ns = archive.times.astype("datetime64[ns]").astype(np.int64)

    @property
    def starts(self) -> np.ndarray:
        """``(M,)`` index of the first frame of every window."""
        return self.windows[:, 0]

    @property
    def name(self) -> str:
        """The archive's name."""
        return self.archive.name

    def __len__(self) -> int:
        return len(self.windows)

    def issue_times(self) -> np.ndarray:
        """``(M,)`` datetime64 issue time (last input frame) of every window."""
        return self.archive.times[self.windows[:, self.input_steps - 1]]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        frame_idx = self.windows[index]
        frames = self.archive.read(frame_idx)  # (T, H, W) mm/h, NaN missing
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
            "issue_time": torch.tensor(self._issue_ns[frame_idx[t_in - 1]], dtype=torch.int64),
        }


class RadarDataModule(L.LightningDataModule):
    """Radar rainfall nowcasting windows from one or several archives, streamed lazily.

    A batch is a dict (``docs/data_contract.md``): ``inputs`` float32
    ``(B, T_in, 1, H, W)`` and ``targets`` float32 ``(B, T_out, 1, H, W)`` in network
    space (``transform.encode`` of rain rate in mm/h, missing inputs filled with
    ``encode(0)``), ``mask`` bool ``(B, T_out, 1, H, W)`` (``False`` for missing or
    padded target pixels) and ``issue_time`` int64 ``(B,)`` (ns since 1970-01-01 UTC of
    the last input frame). Scores are computed on ``transform.decode(...)`` in mm/h.

    The archives are either ``path`` and the reader settings below (one archive, the
    short form), or ``archives``: a list of :class:`~nowcast.data.archives.RadarSource`
    (nested ``_target_`` in the config), each with its own reader settings and periods.

    Parameters
    ----------
    path
        One archive: directory (searched recursively), glob pattern, file or list of
        files, or a Zarr store; see :class:`~nowcast.data.radar_io.RadarArchive`. When
        given, ``archives`` is ignored (so ``data.path=...`` points a stored config at
        another archive).
    archives
        Several archives (or one), each a :class:`RadarSource`; names must be unique.
    importer, importer_kwargs
        pysteps importer name and its arguments (``None``: CF netCDF or Zarr).
    variable, time_variable, filename_time_format, filename_time_regex, units,
    accumulation_minutes, zr_a, zr_b, downsample, skip_bad_files, chunks,
    max_rain_rate, dbz_range, strict_values
        Reader settings of the ``path`` archive, see
        :class:`~nowcast.data.radar_io.RadarArchive` (``zr_a``/``zr_b`` ``None``: the
        importer's relation, else Marshall-Palmer 200, 1.6; HKO 58.53, 1.56).
    transform
        mm/h <-> network space; default :class:`~nowcast.data.transforms.LogRainRate`.
    input_steps, output_steps
        ``T_in`` past frames (the last one is the issue time) and ``T_out`` leads.
    train_period, val_period, test_period
        ``[start, end]`` or a list of ``[start, end]``, ISO times, inclusive, of the
        FRAMES of a split; a window belongs to a split only if all its frames do. An
        archive's own periods override these. ``train_period=None``: every frame outside
        the val and test periods. ``val_period=None``: no validation;
        ``test_period=None``: ``trainer.test`` raises.
    allow_overlapping_periods
        Overlapping train/val/test periods of one archive are an error at ``setup``
        (they leak test data into training) unless this is ``True``.
    time_step
        Time between the frames of a window (``"10min"``); ``None``: the archives' own
        step (which must then be the same for all). An archive whose step divides it
        contributes windows at every phase; one whose step does not is an error.
    window_stride
        Keep every n-th training window (1: all, overlapping by T-1 frames).
    test_window_stride
        The same for val and test windows; ``None``: ``window_stride``.
    min_wet_fraction, wet_threshold
        Training windows whose fraction of valid pixels >= ``wet_threshold`` mm/h (over
        all T frames, on the downsampled grid) is below ``min_wet_fraction`` are
        dropped; 0 keeps all. Costs one read of every training frame at ``setup``.
    crop_size
        Random training crops, int or ``[h, w]`` on the downsampled grid; ``None``: full
        domain (one archive, or archives of one grid). Validation and test always see
        the full domain.
    pad_multiple
        Pad full-domain frames (bottom/right, masked) to a multiple of this, e.g. the
        total spatial stride of the network.
    augment
        Randomly rotate (multiples of 90 degrees) and flip training windows.
    cache_frames
        Decoded frames each archive keeps in memory (least recently used out), per
        process; ``None``: one window's worth, enough for sliding windows read in order.
        Random training windows re-read frames every epoch, and decoding native radar
        formats costs more than the network on a CPU, so a training on a few days of radar
        holds them all: a 765 x 700 frame is 2.1 MB (``experiment=radar_multi`` sets
        4000). The ``min_wet_fraction`` pass fills the cache too.
    batch_size, num_workers
        DataLoader settings; each worker opens its own file handles.
    multiprocessing_context
        How DataLoader workers start: ``"spawn"`` (default) or ``"forkserver"`` give each
        worker a clean process that receives the dataset pickled, without the parent's
        open files; ``"fork"`` is faster to start but netCDF4/HDF5 are not fork-safe: a
        worker reading through the library state copied from a parent with open files
        can crash (seen as a segfault in a test run).
    native_step
        The ``path`` archive's own step, e.g. ``"10min"``; ``None`` infers the most
        common spacing.

    Attributes
    ----------
    transform, num_leads, lead_times (``["10min", ...]``), step (``time_step`` as
    timedelta64), sources (the :class:`RadarSource` list), archive (the first
    :class:`RadarArchive`), grid (its :class:`RadarGrid`), frame_shape (padded
    ``(H, W)`` of its val/test frames), val_names (the archive of each validation
    loader, ``None`` with one archive); :meth:`split_periods`.
    """

    def __init__(
        self,
        path: str | Path | Sequence[str | Path] | None = None,
        variable: str | None = None,
        time_variable: str = "valid_time",
        filename_time_format: str | None = None,
        units: str | None = None,
        accumulation_minutes: float | None = None,
        zr_a: float | None = None,
        zr_b: float | None = None,
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
        archives: Sequence[RadarSource] | RadarSource | None = None,
        importer: str | None = None,
        importer_kwargs: Mapping[str, Any] | None = None,
        max_rain_rate: float | None = DEFAULT_MAX_RAIN_RATE,
        dbz_range: Sequence[float] | None = DEFAULT_DBZ_RANGE,
        strict_values: bool = False,
        allow_overlapping_periods: bool = False,
        native_step: str | None = None,
        cache_frames: int | None = None,
    ) -> None:
        super().__init__()
        if input_steps < 1 or output_steps < 1:
            raise ValueError(f"input_steps and output_steps must be >= 1, got {input_steps}, {output_steps}")
        if window_stride < 1 or (test_window_stride is not None and test_window_stride < 1):
            raise ValueError("window strides must be >= 1")
        if not 0.0 <= min_wet_fraction <= 1.0:
            raise ValueError(f"min_wet_fraction must be in [0, 1], got {min_wet_fraction}")
        self.transform = transform if transform is not None else LogRainRate()
        self.input_steps = int(input_steps)
        self.output_steps = int(output_steps)
        self.periods: dict[str, Periods] = {
            split: parse_periods(f"{split}_period", p)
            for split, p in zip(SPLITS, (train_period, val_period, test_period))
        }
        self.allow_overlapping_periods = bool(allow_overlapping_periods)
        if path is not None:
            if archives:
                log.warning("data.path is set: it is the one archive, data.archives is ignored")
            archives = [RadarSource(
                path, importer=importer, importer_kwargs=importer_kwargs,
                filename_time_format=filename_time_format, filename_time_regex=filename_time_regex,
                variable=variable, time_variable=time_variable, units=units,
                accumulation_minutes=accumulation_minutes, zr_a=zr_a, zr_b=zr_b,
                downsample=downsample, skip_bad_files=skip_bad_files, chunks=chunks,
                native_step=native_step, max_rain_rate=max_rain_rate, dbz_range=dbz_range,
                strict_values=strict_values,
            )]
        elif archives is None or (isinstance(archives, Sequence) and len(archives) == 0):
            raise ValueError("the radar datamodule needs data.path (one archive) or data.archives")
        elif isinstance(archives, RadarSource):
            archives = [archives]
        self.sources: list[RadarSource] = list(archives)  # type: ignore[arg-type]
        for src in self.sources:
            if not isinstance(src, RadarSource):
                raise TypeError(
                    f"data.archives entries must be RadarSource objects (_target_: "
                    f"nowcast.data.archives.RadarSource), got {type(src).__name__}"
                )
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"archive names must be unique, got {names}; set `name` on each")
        weights = [s.weight for s in self.sources]
        if any(w is None for w in weights) and any(w is not None for w in weights):
            raise ValueError(f"give a weight to every archive or to none, got {dict(zip(names, weights))}")
        self.path = self.sources[0].path
        self._time_step = None if time_step is None else np.timedelta64(_to_timedelta(time_step), "ns")
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
        if cache_frames is not None and int(cache_frames) < 0:
            raise ValueError(f"cache_frames must be >= 0 or null, got {cache_frames}")
        self.cache_frames = None if cache_frames is None else int(cache_frames)
        self._archives: dict[str, RadarArchive] = {}
        # {split: {archive name: dataset}}; an archive without windows in a split is absent
        self._datasets: dict[str, dict[str, RadarWindowDataset]] = {}
        self.val_names: list[str] | None = None

    # ------------------------------------------------------------------ attributes
    def opened(self, source: RadarSource) -> RadarArchive:
        """The scanned archive of ``source`` (scanned on first use)."""
        if source.name not in self._archives:
            # At least a window's worth of decoded frames: sliding windows read each frame once.
            window = self.input_steps + self.output_steps
            cache = window if self.cache_frames is None else max(self.cache_frames, window)
            self._archives[source.name] = source.open(cache_frames=cache)
        return self._archives[source.name]

    @property
    def archive(self) -> RadarArchive:
        """The first (with ``path``: the only) archive, scanned on first use."""
        return self.opened(self.sources[0])

    @property
    def step(self) -> np.timedelta64:
        """Time between the frames of a window (``time_step``, or the archives' own)."""
        if self._time_step is not None:
            return self._time_step
        steps = {s.name: self.opened(s).step for s in self.sources}
        if len(set(steps.values())) > 1:
            shown = ", ".join(f"{n} {v / np.timedelta64(1, 'm'):g} min" for n, v in steps.items())
            raise RadarDataError(f"the archives have different time steps ({shown}); set data.time_step")
        return next(iter(steps.values()))

    @property
    def num_leads(self) -> int:
        """``T_out``, the number of lead times."""
        return self.output_steps

    @property
    def lead_times(self) -> list[str]:
        """Lead time of every target frame, e.g. ``["10min", ..., "60min"]``."""
        minutes = self.step / np.timedelta64(1, "m")
        return [f"{minutes * (k + 1):g}min" for k in range(self.output_steps)]

    @property
    def grid(self) -> RadarGrid:
        """Coordinates of the first archive's (downsampled) full-domain grid, with ``padded_shape``."""
        return self.archive.grid(self.pad_multiple)

    @property
    def frame_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the first archive's validation/test frames, after downsampling and padding."""
        return self.grid.padded_shape  # type: ignore[return-value]

    # ------------------------------------------------------------------ periods
    def _periods(self, source: RadarSource) -> dict[str, Periods]:
        """The archive's own periods, else the datamodule's."""
        return {split: source.periods[split] if source.periods[split] is not None else self.periods[split]
                for split in SPLITS}

    def check_periods(self) -> None:
        """Raise if two splits of one archive overlap (unless ``allow_overlapping_periods``)."""
        for source in self.sources:
            periods = self._periods(source)
            for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
                for pa in periods[a] or []:
                    for pb in periods[b] or []:
                        if pa[0] <= pb[1] and pb[0] <= pa[1]:
                            message = (
                                f"archive {source.name!r}: {a}_period {format_period(pa)} overlaps "
                                f"{b}_period {format_period(pb)}"
                            )
                            if not self.allow_overlapping_periods:
                                raise RadarDataError(
                                    message + ": the scores would be measured on data the model "
                                    "saw; separate them or set data.allow_overlapping_periods=true"
                                )
                            log.warning("%s (allowed by allow_overlapping_periods)", message)

    def split_periods(self) -> dict[str, dict[str, list[list[str]] | None]]:
        """Each archive's frame periods per split, as ISO strings.

        Returns
        -------
        ``{archive name: {"train": [[start, end], ...], "val": ..., "test": ...}}``;
        ``None`` for a split that is not configured. An implicit training period (every
        frame outside val/test) is given as the runs of training frames of the scanned
        archive, so that a test period elsewhere can be checked against it.
        """
        out: dict[str, dict[str, list[list[str]] | None]] = {}
        for source in self.sources:
            periods = self._periods(source)
            entry: dict[str, list[list[str]] | None] = {}
            for split in SPLITS:
                spans = periods[split]
                if split == "train" and spans is None:
                    archive = self.opened(source)
                    frames = self._split_frames(source, archive, "train")
                    edges = np.flatnonzero(np.diff(np.r_[0, frames.astype(np.int8), 0]))
                    spans = [(archive.times[s], archive.times[e - 1]) for s, e in zip(edges[::2], edges[1::2])]
                entry[split] = None if spans is None else [
                    [np.datetime_as_string(p, "s") for p in span] for span in spans
                ]
            out[source.name] = entry
        return out

    # ------------------------------------------------------------------ splits
    @staticmethod
    def _in_periods(times: np.ndarray, periods: Periods) -> np.ndarray:
        inside = np.zeros(len(times), dtype=bool)
        for start, end in periods or []:
            inside |= (times >= start) & (times <= end)
        return inside

    def _split_frames(self, source: RadarSource, archive: RadarArchive, split: str) -> np.ndarray:
        """``(N,)`` bool: the frames of ``split`` in ``archive``."""
        periods = self._periods(source)
        if split == "train" and periods["train"] is None:
            held_out = self._in_periods(archive.times, periods["val"]) | self._in_periods(archive.times, periods["test"])
            return ~held_out
        if periods[split] is None:
            raise RadarDataError(f"archive {source.name!r}: no {split}_period configured")
        times = archive.times
        for period in periods[split]:
            if not self._in_periods(times, [period]).any():
                raise RadarDataError(
                    f"archive {source.name!r}: {split}_period {format_period(period)} selects "
                    f"no frame; the archive {source.path} spans {times[0]} .. {times[-1]}"
                )
        return self._in_periods(times, periods[split])

    def _check_step(self, source: RadarSource, archive: RadarArchive) -> np.timedelta64:
        step = self.step
        native = archive.step
        if native <= np.timedelta64(0, "ns") or step % native != np.timedelta64(0, "ns"):
            raise RadarDataError(
                f"archive {source.name!r}: its time step {native / np.timedelta64(1, 'm'):g} min "
                f"does not divide the experiment's time_step {step / np.timedelta64(1, 'm'):g} min; "
                "use archives whose step divides data.time_step (5 min serves 10 min)"
            )
        return step

    def _build(self, source: RadarSource, split: str) -> RadarWindowDataset:
        archive = self.opened(source)
        length = self.input_steps + self.output_steps
        if len(archive) < length:
            raise RadarDataError(
                f"the radar archive {source.path} has {len(archive)} frames, fewer than one "
                f"window of input_steps + output_steps = {length}"
            )
        step = self._check_step(source, archive)
        frames = self._split_frames(source, archive, split)
        stride = self.window_stride if split == "train" else self.test_window_stride
        windows, gaps = window_indices(archive.times, step, length, frames, stride)
        minutes = step / np.timedelta64(1, "m")
        if gaps:
            log.info("%s/%s: dropped %d windows that span a gap in the time axis", source.name, split, gaps)
        periods = self._periods(source)[split]
        if windows.size == 0:
            raise RadarDataError(
                f"archive {source.name!r}, {split}: no window of {length} consecutive frames "
                f"({minutes:g} min apart) lies inside the split ({int(frames.sum())} frames, "
                f"{split}_period={self._format(periods)}); too few frames"
            )
        if periods is not None and len(periods) > 1:
            issue = archive.times[windows[:, self.input_steps - 1]]
            for period in periods:
                if not ((issue >= period[0]) & (issue <= period[1])).any():
                    raise RadarDataError(
                        f"archive {source.name!r}: {split}_period {format_period(period)} selects "
                        f"no window of {length} frames {minutes:g} min apart"
                    )
        if split == "train" and self.min_wet_fraction > 0:
            windows = self._drop_dry(archive, windows, source.name)
        crop = self.crop_size if split == "train" else None
        if crop is not None and (crop[0] > archive.shape[0] or crop[1] > archive.shape[1]):
            raise ValueError(f"archive {source.name!r}: crop_size {crop} is larger than its grid {archive.shape}")
        issue = archive.times[windows[:, self.input_steps - 1]]
        log.info("%s/%s: %d windows, issue times %s .. %s", source.name, split, len(windows), issue[0], issue[-1])
        return RadarWindowDataset(
            archive, windows, self.input_steps, self.output_steps, self.transform,
            crop_size=crop, pad_multiple=1 if crop is not None else self.pad_multiple,
            augment=self.augment and split == "train",
        )

    @staticmethod
    def _format(periods: Periods) -> str:
        return "None" if periods is None else ", ".join(format_period(p) for p in periods)

    def _drop_dry(self, archive: RadarArchive, windows: np.ndarray, name: str) -> np.ndarray:
        """Keep windows whose wet fraction is >= ``min_wet_fraction`` (one pass over frames)."""
        t0 = time.perf_counter()
        idx = np.unique(windows)
        wet = np.zeros(len(archive))
        valid = np.zeros(len(archive))
        for chunk in np.array_split(idx, max(1, len(idx) // 32)):
            # through the cache when it holds them all: training reads them again
            frames = archive.read(chunk, cache=archive.cache_frames >= len(idx))  # (n, H, W) mm/h
            wet[chunk] = (frames >= self.wet_threshold).sum(axis=(1, 2))  # NaN >= x is False
            valid[chunk] = np.isfinite(frames).sum(axis=(1, 2))
        fraction = wet[windows].sum(axis=1) / np.maximum(valid[windows].sum(axis=1), 1.0)
        kept = windows[fraction >= self.min_wet_fraction]
        log.info(
            "%s/train: dry filter (>= %.3g of pixels >= %g mm/h) kept %d of %d windows (%.1f s)",
            name, self.min_wet_fraction, self.wet_threshold, len(kept), len(windows),
            time.perf_counter() - t0,
        )
        if kept.size == 0:
            raise RadarDataError(
                f"archive {name!r}, train: no window has a wet fraction >= {self.min_wet_fraction} "
                f"(wet_threshold {self.wet_threshold} mm/h); lower min_wet_fraction"
            )
        return kept

    def _split_sources(self, split: str) -> list[RadarSource]:
        """The archives that take part in ``split`` (all for train; those with a period else)."""
        if split == "train" or len(self.sources) == 1:
            return list(self.sources)
        return [s for s in self.sources if self._periods(s)[split] is not None]

    def datasets(self, split: str) -> dict[str, RadarWindowDataset]:
        """``{archive name: window dataset}`` of ``"train"``, ``"val"`` or ``"test"``."""
        if split not in self._datasets:
            self.check_periods()
            sources = self._split_sources(split)
            if not sources:
                raise RadarDataError(f"no {split}_period configured for any archive")
            built = {s.name: self._build(s, split) for s in sources}
            if split == "train" and len(built) > 1 and self.crop_size is None:
                shapes = {n: d.archive.shape for n, d in built.items()}
                if len(set(shapes.values())) > 1:
                    raise RadarDataError(
                        f"archives of different grids {shapes} train together only in crops of "
                        "one size: set data.crop_size"
                    )
            self._datasets[split] = built
        return self._datasets[split]

    def dataset(self, split: str) -> Dataset:
        """The window dataset of ``split``: the archive's, or a ``ConcatDataset`` of several."""
        parts = list(self.datasets(split).values())
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Check the periods, scan the archives and build the windows ``stage`` needs."""
        self.check_periods()
        wanted = {
            "fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"],
            None: ["train", "val", "test"],
        }[stage]
        for split in wanted:
            if split in self._datasets:
                continue
            if split in ("val", "test") and not self._has(split):
                if split == "val" and stage in ("fit", None):
                    log.warning("no val_period: training runs without validation")
                if stage is None or split == "val":
                    continue
            self.datasets(split)
        if "val" in self._datasets:
            self.val_names = list(self._datasets["val"]) if len(self._datasets["val"]) > 1 else None

    def _has(self, split: str) -> bool:
        return any(self._periods(s)[split] is not None for s in self.sources)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            multiprocessing_context=self.multiprocessing_context if self.num_workers > 0 else None,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        parts = list(self.datasets("train").values())
        if len(parts) == 1:
            return self._loader(parts[0], batch_size=self.batch_size, shuffle=True)
        weights = [s.weight for s in self.sources]
        if weights[0] is None:  # proportional to the windows: a plain shuffle of all
            return self._loader(ConcatDataset(parts), batch_size=self.batch_size, shuffle=True)
        total = sum(weights)  # type: ignore[arg-type]
        per_window = np.concatenate([np.full(len(d), w / total / len(d)) for d, w in zip(parts, weights)])
        sampler = WeightedRandomSampler(torch.from_numpy(per_window), num_samples=len(per_window),
                                        replacement=True)
        return self._loader(ConcatDataset(parts), batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader | list:
        if not self._has("val"):
            return []
        parts = self.datasets("val")
        self.val_names = list(parts) if len(parts) > 1 else None
        loaders = [self._loader(d, batch_size=self.batch_size, shuffle=False) for d in parts.values()]
        return loaders[0] if len(loaders) == 1 else loaders

    def _ordered_loader(self, split: str) -> DataLoader:
        """Windows in time order, archive by archive; a batch never mixes archives (grids)."""
        parts = list(self.datasets(split).values())
        if len(parts) == 1:
            return self._loader(parts[0], batch_size=self.batch_size, shuffle=False)
        batches, offset = [], 0
        for d in parts:
            batches += [list(range(offset + i, offset + min(i + self.batch_size, len(d))))
                        for i in range(0, len(d), self.batch_size)]
            offset += len(d)
        return self._loader(ConcatDataset(parts), batch_sampler=batches)

    def test_dataloader(self) -> DataLoader:
        return self._ordered_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._ordered_loader("test")

    def teardown(self, stage: str | None = None) -> None:
        for archive in self._archives.values():
            archive.close()
