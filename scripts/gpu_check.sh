#!/usr/bin/env bash
# GPU check of issue 15, in one call of at most 8 minutes on a machine with a CUDA GPU:
#   (a) the test suite's CUDA cases (`pytest -m cuda`),
#   (b) the benchmark's GPU rows: scripts/bench_convlstm.py --config G (B 16, T 10,
#       128x128, hidden [128, 128, 128]), float32 and bf16 autocast, vs the reference,
#   (c) 2 minutes of `train.py experiment=mmnist_convlstm trainer=gpu`, reporting
#       training sequences per second (nowcast.throughput.SequenceThroughput).
# Each part is time-boxed with `timeout`; a summary comes last. Everything is written to
# $OUT (the device tool's output folder) if set, else to gpu_check_out/<time>/.
#
#   bash scripts/gpu_check.sh wheels   # HERE, with internet: fetch the Python packages
#                                      # the GPU machine lacks into .whl/ (git-ignored)
#   bash scripts/gpu_check.sh          # THERE: run the check (reads .whl/ if present)
#
# The GPU machine of this workplace has no network; its python3 has torch, lightning,
# torchmetrics, xarray, pytest, matplotlib, but not hydra-core/omegaconf (+ antlr4),
# netCDF4 (+ cftime) or mlxtend: `wheels` downloads those for its Python (3.12 by
# default; GPU_PY=3.11 for another). How to call it: docs/benchmarks.md ("GPU check").
# Environment: GPU_CHECK_TRAIN_TIME (default 00:00:02:00), GPU_CHECK_REPEATS (3),
# PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."

# -- the wheels, fetched on a machine with internet -------------------------------------------
if [[ "${1:-}" == wheels ]]; then
    set -e
    py=${GPU_PY:-3.12}
    mkdir -p .whl
    # Same versions as the development machines (pyproject ranges); pure-Python or manylinux.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        hydra-core==1.3.8 omegaconf==2.3.1 netCDF4==1.7.5.1.post1 cftime==1.6.6.1 mlxtend==0.25.0
    # antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 pins) is published as source only:
    # build its (pure-Python) wheel here.
    python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
    ls -l .whl
    du -sh .whl
    exit 0
fi
[[ $# -eq 0 ]] || { echo "usage: $0 [wheels]" >&2; exit 2; }

PY=${PYTHON:-python3}
TRAIN_TIME=${GPU_CHECK_TRAIN_TIME:-00:00:02:00}
REPEATS=${GPU_CHECK_REPEATS:-3}
OUT_DIR=${OUT:-gpu_check_out/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.md"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg WANDB_MODE=offline
START=$SECONDS
LIMIT=${GPU_CHECK_LIMIT_S:-470}  # the whole script, seconds: under the 8-minute call

# Seconds left for a part: its own budget, or less if the whole run would overrun.
budget() {
    local left=$((LIMIT - (SECONDS - START) - 10))
    ((left < $1)) && echo $((left > 5 ? left : 5)) || echo "$1"
}

# part NAME BUDGET_S LOGFILE CMD...: run CMD under `timeout`, note the outcome.
part() {
    local name=$1 secs t0 rc
    secs=$(budget "$2")
    local logfile=$3
    shift 3
    echo "== $name (at most ${secs} s): $*" | tee -a "$logfile"
    t0=$SECONDS
    timeout --kill-after=10 "$secs" "$@" >>"$logfile" 2>&1
    rc=$?
    local how="exit $rc"
    ((rc == 124 || rc == 137)) && how="stopped at its ${secs} s limit"
    echo "- $name: $how after $((SECONDS - t0)) s (log: $(basename "$logfile"))" >>"$SUMMARY"
    echo "== $name: $how after $((SECONDS - t0)) s"
    return $rc
}

echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')" >"$SUMMARY"
echo >>"$SUMMARY"

# -- the packages the machine lacks, from carried wheels --------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .whl/*.whl || { echo "wheel install failed" | tee -a "$SUMMARY"; }
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The repository first: scripts/ import nowcast from here, not from an installed copy.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

ENV_LOG="$OUT_DIR/env.txt"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "CUDA", torch.version.cuda,
      "cuDNN", torch.backends.cudnn.version(), "GPU visible:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("GPU:", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
for name in ("lightning", "torchmetrics", "hydra", "omegaconf", "xarray", "netCDF4", "mlxtend", "numpy", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # report, do not stop: the parts below say what fails
        print(name, "MISSING:", err)
EOF
} >"$ENV_LOG" 2>&1
cat "$ENV_LOG"
{ echo '```'; cat "$ENV_LOG"; echo '```'; echo; } >>"$SUMMARY"

# -- (a) the CUDA tests -----------------------------------------------------------------------
part "CUDA tests (pytest -m cuda)" 90 "$OUT_DIR/pytest.log" \
    "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider --continue-on-collection-errors tests

# -- (b) the benchmark's GPU rows -------------------------------------------------------------
part "benchmark, config G" 160 "$OUT_DIR/bench.log" \
    "$PY" scripts/bench_convlstm.py --config G --device cuda --repeats "$REPEATS"

# -- (c) two minutes of training --------------------------------------------------------------
# test=false, data.test_size=16: the experiment would write and score a 10,000-sequence
# test set, minutes of CPU work that measure nothing here. trainer.min_epochs=0: the
# trainer config's min_epochs=1 outranks max_time, so a slow epoch would overrun the box.
extra=()
# The experiment swaps the scheduler for OneCycleLR, but the model config's
# CosineAnnealingLR T_max merges into it (TypeError at the first step): drop it while
# the composed config still has it.
if "$PY" - >/dev/null 2>&1 <<'EOF'
import os
import sys

from hydra import compose, initialize_config_dir

with initialize_config_dir(version_base="1.3", config_dir=os.path.abspath("configs")):
    cfg = compose("train", overrides=["experiment=mmnist_convlstm"])
sys.exit(0 if "T_max" in cfg.model.scheduler and "OneCycle" in cfg.model.scheduler._target_ else 1)
EOF
then
    extra+=("~model.scheduler.T_max")
fi
part "train mmnist_convlstm, trainer=gpu, max_time $TRAIN_TIME" 190 "$OUT_DIR/train.log" \
    "$PY" train.py experiment=mmnist_convlstm trainer=gpu "++trainer.max_time=$TRAIN_TIME" \
    trainer.min_epochs=0 test=false data.test_size=16 callbacks.progress_bar.refresh_rate=0 \
    "paths.log_dir=/tmp/gpu_check_logs" "${extra[@]}" \
    '+callbacks.throughput={_target_: nowcast.throughput.SequenceThroughput, warmup_batches: 20}'

# -- summary ----------------------------------------------------------------------------------
# Lines matching PATTERN in LOG, or the log's last lines where none match (a failed part).
found_or_tail() {
    grep -E "$2" "$1" | tail -"${3:-5}" || tail -8 "$1"
}
{
    echo
    echo "## CUDA tests"
    echo '```'
    found_or_tail "$OUT_DIR/pytest.log" "^(SKIPPED|FAILED|ERROR)|[0-9]+ (passed|failed|skipped|deselected)" 20
    echo '```'
    echo
    echo "## Benchmark (config G)"
    echo
    if grep -q "^Command:" "$OUT_DIR/bench.log"; then
        sed -n '/^Command:/,$p' "$OUT_DIR/bench.log" | grep -v '^\[' | grep -v '^== '
        grep "max |ours - reference|" "$OUT_DIR/bench.log"
    else
        echo '```'; tail -8 "$OUT_DIR/bench.log"; echo '```'
    fi
    echo
    echo "## Training"
    echo '```'
    found_or_tail "$OUT_DIR/train.log" "throughput:|Time limit reached|validation MSE"
    echo '```'
    echo
    echo "Total: $((SECONDS - START)) s"
} >>"$SUMMARY"
cat "$SUMMARY"
