"""Score the radar_multi network's motion prior alone, in several settings, on periods that are
not held out, to choose the prior's settings without looking at the test sets.

The prior is the block-matching start of ``nowcast.models.MotionNowcaster``
(``motion_prior``): with the backbone's head at zero the network is exactly the last input
frame moved along it, so each setting is scored as that network, with no training. The
archives are ``configs/data/radar_multi.yaml``'s; by default each is scored on periods
outside its held-out ones (BoM's training and validation morning, KNMI's validation
evening, FMI's and RMI's training events), every ``--window-stride``-th window of the
whole domain. Prints CSI at 1 mm/h and MAE (mm/h) per lead for every setting::

    python scripts/score_motion_prior.py \\
        --variant 'whole={}' --variant 't256={"prior_tile": 256}' \\
        --variant 't256_span2={"prior_tile": 256, "prior_span": 2}'

A variant is ``NAME=JSON`` of ``MotionNowcaster`` prior arguments (``prior_radius``,
``prior_span``, ``prior_tile``, ``prior_stride``, ``prior_refine``,
``prior_refine_iterations``, ``prior_refine_weighting``, ``prior_trajectory``).
``--optical-flow`` scores pysteps' optical-flow extrapolation (the evaluation baseline) on
the same windows, for reference.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nowcast.baselines import get_baseline
from nowcast.data.radar import RadarDataModule
from nowcast.data.transforms import LogRainRate
from nowcast.lit_module import compute_scores, update_scores
from nowcast.metrics import CategoricalScores, ContinuousScores
from nowcast.models import EncoderForecaster, MotionNowcaster

ROOT = Path(__file__).resolve().parents[1]
# outside every held-out period (configs/data/radar_multi.yaml): BoM's training and
# validation morning, KNMI's validation evening, FMI's and RMI's training events
DEFAULT_PERIODS = {
    "bom": ["2020-10-31T00:00", "2020-10-31T07:50"],
    "knmi": ["2021-02-06T00:00", "2021-02-06T23:59"],
    "fmi": ["2016-09-28T00:00", "2016-09-28T23:59"],
    "rmi": ["2021-07-04T00:00", "2021-07-04T23:59"],
}
PRIOR_KEYS = {"prior_radius", "prior_span", "prior_tile", "prior_stride", "prior_refine",
              "prior_refine_iterations", "prior_refine_weighting", "prior_trajectory"}


def prior_network(input_steps: int, output_steps: int, **prior) -> MotionNowcaster:
    """The radar_multi network with its head at zero: the last frame moved by the prior."""
    bad = set(prior) - PRIOR_KEYS
    if bad:
        raise ValueError(f"a variant sets only {sorted(PRIOR_KEYS)}, got {sorted(bad)}")
    backbone = EncoderForecaster(1, 3, [4], 3, (1, 2, 2), input_steps, output_steps, (128, 128),
                                 patch_size=4, output_activation="identity")
    recipe = OmegaConf.load(ROOT / "configs" / "model" / "net" / "radar_motion.yaml")
    args = {"prior_radius": recipe.prior_radius, **prior}  # the recipe's search unless set
    return MotionNowcaster(backbone, motion_prior=True, init_std=0.0, **args).eval()


def archives(root: Path) -> tuple[dict, list[dict]]:
    """``(data config, archive configs)`` of ``configs/data/radar_multi.yaml``, paths resolved."""
    data = OmegaConf.load(root / "configs" / "data" / "radar_multi.yaml")
    base = OmegaConf.load(root / "configs" / "data" / "radar.yaml")
    merged = OmegaConf.merge(base, {k: v for k, v in data.items() if k not in ("defaults", "archives")})
    found = []
    for source in data.archives:
        item = OmegaConf.to_container(source)
        item["path"] = item["path"].replace("${paths.root_dir}", str(root))
        found.append(item)
    return OmegaConf.to_container(merged), found


def score(datamodule: RadarDataModule, transform: LogRainRate, nets: dict[str, MotionNowcaster],
          num_leads: int, baselines: dict[str, Callable] | None = None
          ) -> tuple[int, dict[str, dict[str, float]], dict[str, float]]:
    """Windows scored, ``{variant: {score: value}}`` over the datamodule's test windows and
    each variant's seconds per window; ``baselines`` (physical units in and out) are scored
    alongside."""
    forecasters = {name: (lambda x, n, net=net: transform.decode(net(x))) for name, net in nets.items()}
    forecasters |= {name: (lambda x, n, f=f: f(transform.decode(x), n)) for name, f in (baselines or {}).items()}
    scores = {name: torch.nn.ModuleDict({"continuous": ContinuousScores(num_leads),
                                         "categorical": CategoricalScores([0.5, 1.0, 5.0], num_leads)})
              for name in forecasters}
    seconds = dict.fromkeys(forecasters, 0.0)
    windows = 0
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            target = transform.decode(batch["targets"].float())
            windows += target.shape[0]
            for name, forecast in forecasters.items():
                start = time.perf_counter()
                out = forecast(batch["inputs"].float(), num_leads)
                seconds[name] += time.perf_counter() - start
                update_scores(scores[name], out, target, batch.get("mask"))
    return (windows, {name: compute_scores(s, "", None) for name, s in scores.items()},
            {name: t / max(windows, 1) for name, t in seconds.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="a prior setting (repeatable); default: the whole frame and 256 px tiles")
    parser.add_argument("--archive", action="append", default=[], help="archive names (default: all)")
    parser.add_argument("--period", action="append", default=[], metavar="NAME=START,END",
                        help="score an archive on another period than the default")
    parser.add_argument("--window-stride", type=int, default=2)
    parser.add_argument("--optical-flow", action="store_true",
                        help="also score pysteps' optical-flow extrapolation (needs the pysteps extra)")
    parser.add_argument("--out", type=Path, help="write every score as JSON here")
    args = parser.parse_args()

    variants = {}
    for text in args.variant or ['whole={}', 't256={"prior_tile": 256}']:
        name, _, spec = text.partition("=")
        try:
            variants[name] = json.loads(spec)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--variant {text!r}: expected NAME=JSON, {err}") from None
    periods = dict(DEFAULT_PERIODS)
    for text in args.period:
        name, _, span = text.partition("=")
        if len(span.split(",")) != 2:
            raise SystemExit(f"--period {text!r}: expected NAME=START,END, e.g. knmi=2021-02-06T00:00,2021-02-06T23:59")
        periods[name] = span.split(",")
    data, sources = archives(ROOT)
    chosen = args.archive or [s["name"] for s in sources]
    unknown = set(chosen) - {s["name"] for s in sources}
    if unknown:
        raise SystemExit(f"unknown archive(s) {sorted(unknown)}; configs/data/radar_multi.yaml has "
                         f"{[s['name'] for s in sources]}")
    transform = instantiate(data["transform"])  # the project's own config
    n_in, n_out = data["input_steps"], data["output_steps"]
    nets = {name: prior_network(n_in, n_out, **spec) for name, spec in variants.items()}
    baselines = {"optical_flow": get_baseline("optical_flow")} if args.optical_flow else {}
    results, seconds = {}, {}
    for source in sources:
        name = source.pop("name")
        if name not in chosen:
            continue
        source.pop("_target_", None)
        for key in ("train_period", "val_period", "test_period"):
            source.pop(key, None)
        start = time.perf_counter()
        dm = RadarDataModule(**source, transform=transform, time_step=data["time_step"], input_steps=n_in,
                             output_steps=n_out, test_period=periods[name], test_window_stride=args.window_stride,
                             pad_multiple=data["pad_multiple"], batch_size=4)
        dm.setup("test")
        windows, results[name], seconds[name] = score(dm, transform, nets, n_out, baselines)
        print(f"== {name} {periods[name][0]}..{periods[name][1]}: {windows} windows, "
              f"{time.perf_counter() - start:.0f} s (s per window after each name)")
        for variant, flat in results[name].items():
            csi = " / ".join(f"{flat[f'/csi_1mmh/lead{k:02d}']:.3f}" for k in range(1, n_out + 1))
            mae = " / ".join(f"{flat[f'/mae/lead{k:02d}']:.4f}" for k in range(1, n_out + 1))
            print(f"{variant:14s} {seconds[name][variant]:5.2f} CSI@1 {csi} | MAE {mae}")
    if args.out:
        args.out.write_text(json.dumps({"variants": variants, "periods": periods, "scores": results,
                                        "seconds_per_window": seconds}, indent=1))


if __name__ == "__main__":
    main()
