#!/usr/bin/env bash
# Prove nowcast's SLURM support on a real (single-node, localhost-only) SLURM cluster.
#
#   bash scripts/slurm/test_local_cluster.sh [work dir]       # as root, from anywhere
#
# Installs slurmctld/slurmd/slurm-client/munge with apt-get if missing, starts munged,
# slurmctld and slurmd (2 CPUs, no cgroups/systemd: proctrack/linuxproc, task/none) with a
# private config in the work dir, then:
#   1. a tiny CPU training through the Hydra submitit launcher (hydra/launcher=slurm);
#   2. a 2-task DDP job (gloo on CPU) through scripts/slurm/train.sbatch: metrics equal a
#      1-process validation of the same checkpoint, one run folder;
#   3. the same job sent USR1 mid-training: it checkpoints, requeues, resumes and ends with
#      as many optimizer steps as job 2.
# Prints PASS/FAIL per step, exits non-zero on any failure, stops the daemons it started.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${1:-$(mktemp -d /tmp/nowcast-slurm.XXXXXX)}
WORK=$(mkdir -p "$WORK" && cd "$WORK" && pwd)
STATE=$WORK/state
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
CPUS=${CPUS:-2}
export SLURM_CONF=$STATE/slurm.conf
FAILED=0
STARTED_MUNGE=0

say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*"; }
pass() { say "PASS $*"; }
fail() { say "FAIL $*"; FAILED=1; }

cleanup() {
    say "cleanup"
    if [ -f "$SLURM_CONF" ] && command -v squeue >/dev/null; then
        for j in $(squeue -h -o %A 2>/dev/null); do scancel "$j" 2>/dev/null; done
        sleep 2
    fi
    for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null
    done
    if [ "$STARTED_MUNGE" = 1 ] && [ -f /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null
    fi
    sleep 1
}
trap cleanup EXIT

# ------------------------------------------------------------------ install and start
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    say "installing SLURM and munge (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null || { fail "apt-get install"; exit 1; }
fi
say "$(slurmctld -V)"

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged && STARTED_MUNGE=1
    sleep 1
fi
munge -n | unmunge >/dev/null 2>&1 || { fail "munged is not working"; exit 1; }

mkdir -p "$STATE/ctld" "$STATE/slurmd"
HOST=$(hostname -s)
sed -e "s#@STATE@#$STATE#g" -e "s#@HOST@#$HOST#g" -e "s#@CPUS@#$CPUS#g" \
    -e "s#@CTLD_PORT@#${CTLD_PORT:-16817}#g" -e "s#@SLURMD_PORT@#${SLURMD_PORT:-16818}#g" \
    "$ROOT/scripts/slurm/slurm.conf.in" > "$SLURM_CONF"
slurmctld -c -f "$SLURM_CONF" || { fail "slurmctld did not start (see $STATE/slurmctld.log)"; exit 1; }
slurmd -f "$SLURM_CONF" || { fail "slurmd did not start (see $STATE/slurmd.log)"; exit 1; }
for _ in $(seq 60); do
    sinfo -h -o %T 2>/dev/null | grep -q idle && break
    sleep 1
done
sinfo -h -o %T | grep -q idle || { fail "node not idle: $(sinfo 2>&1)"; tail -5 "$STATE"/*.log; exit 1; }
say "cluster up: $(sinfo -h -o '%P %D nodes %c CPUs %T')"

# ------------------------------------------------------------------------- helpers
job_state() { scontrol show job -o "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
job_field() { scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | grep "^$2=" | cut -d= -f2-; }

wait_done() {  # job id, timeout s -> echoes the final state
    local state
    for _ in $(seq "$2"); do
        state=$(job_state "$1")
        case "$state" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE)
            echo "$state"; return;; esac
        sleep 1
    done
    echo "TIMEOUT_WAITING($state)"
}

# Tiny Moving-MNIST model: a training epoch takes seconds on a CPU.
TINY=(data.frame_size=32 data.input_steps=4 data.output_steps=3 data.val_size=16
      data.test_size=16 model.net.hidden_channels=[8,8] trainer.log_every_n_steps=1
      trainer.enable_model_summary=false callbacks.progress_bar.refresh_rate=0
      callbacks.forecast_plots.num_samples=1 "paths.log_dir=$WORK/logs" "paths.data_dir=$WORK/data")
# Jobs 2 and 3: 64 sequences per epoch, global batch 8 over 2 ranks -> 8 steps per epoch.
DDP=(trainer.accelerator=cpu trainer.precision=32-true data.train_size=64 data.batch_size=8
     trainer.max_epochs=3 seed=1)
SBATCH=(sbatch --parsable --partition=debug --ntasks-per-node=2 --cpus-per-task=1
        --gpus-per-node=0 --mem=1G --time=10)
cd "$ROOT"

metric() {  # metrics.csv, column -> last non-empty value
    "$PYTHON" - "$1" "$2" <<'EOF'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get(sys.argv[2])]
print(rows[-1][sys.argv[2]] if rows else "")
EOF
}
global_step() {
    "$PYTHON" -c "import sys, torch; print(torch.load(sys.argv[1], weights_only=True)['global_step'])" "$1"
}

# ------------------------------------------- 1. submitit launcher, one CPU task
say "step 1: python train.py -m hydra/launcher=slurm ... (1 task, CPU)"
timeout 300 "$PYTHON" train.py -m hydra/launcher=slurm hydra.launcher.partition=debug \
    hydra.launcher.gpus_per_node=null hydra.launcher.cpus_per_task=1 hydra.launcher.mem_gb=null \
    hydra.launcher.timeout_min=10 "hydra.sweep.dir=$WORK/step1" "${TINY[@]}" \
    data.train_size=32 data.batch_size=8 trainer.max_epochs=1 > "$WORK/step1.log" 2>&1
rc=$?
JOB1=$(ls "$WORK/step1/.submitit" 2>/dev/null | head -1)  # <sweep>/.submitit/<job id>/
# The launcher returns once the job has written its result, while SLURM may still show the
# job RUNNING (epilogue, accounting): wait for its final state, as steps 2 and 3 do.
STATE1=$([ -n "$JOB1" ] && wait_done "$JOB1" 120)
RUN1=$WORK/step1/0
MSE1=$(metric "$RUN1/csv/metrics.csv" val/mse 2>/dev/null)
if [ "$rc" = 0 ] && [ "$STATE1" = COMPLETED ] && [ -f "$RUN1/checkpoints/last.ckpt" ] \
   && [ -f "$RUN1/checkpoints/best.ckpt" ] && [ -n "$MSE1" ]; then
    pass "step 1: submitit job $JOB1 $STATE1; $RUN1 holds checkpoints/{best,last}.ckpt and csv/metrics.csv (val/mse=$MSE1)"
else
    fail "step 1: rc=$rc job=$JOB1 state=$STATE1 val/mse=$MSE1"; tail -30 "$WORK/step1.log"
    tail -30 "$WORK"/step1/.submitit/*/*.err 2>/dev/null
fi

# ------------------------------------------- 2. sbatch, 2-task DDP with gloo
say "step 2: sbatch --ntasks-per-node=2 scripts/slurm/train.sbatch trainer.accelerator=cpu ... (DDP, 2 ranks)"
JOB2=$("${SBATCH[@]}" --output="$WORK/job-%j.out" scripts/slurm/train.sbatch "${TINY[@]}" "${DDP[@]}")
STATE2=$(wait_done "$JOB2" 300)
RUN2=$WORK/logs/train/runs/$JOB2
RUNS2=$(ls "$WORK/logs/train/runs" 2>/dev/null | tr '\n' ' ')
MSE2=$(metric "$RUN2/csv/metrics.csv" val/mse 2>/dev/null)
LOSS2=$(metric "$RUN2/csv/metrics.csv" val/loss 2>/dev/null)
STEPS2=$(global_step "$RUN2/checkpoints/last.ckpt" 2>/dev/null)
# The same checkpoint validated by one process on the whole validation set.
read -r MSE_1P LOSS_1P < <("$PYTHON" - "$RUN2/checkpoints/last.ckpt" 2>/dev/null <<'EOF'
import sys
import lightning as L
from nowcast.evaluate import load_run
model, dm, _ = load_run(sys.argv[1])
out = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False).validate(model, datamodule=dm, verbose=False)[0]
print(out["val/mse"], out["val/loss"])
EOF
)
SAME=$("$PYTHON" -c "import math,sys; a,b,c,d=map(float,sys.argv[1:]); print(int(math.isclose(a,b,rel_tol=1e-5) and math.isclose(c,d,rel_tol=1e-5)))" \
       "${MSE2:-nan}" "${MSE_1P:-nan}" "${LOSS2:-nan}" "${LOSS_1P:-nan}" 2>/dev/null)
RANKS=$(grep -c "Initializing distributed: GLOBAL_RANK" "$WORK/job-$JOB2.out" 2>/dev/null)
if [ "$STATE2" = COMPLETED ] && [ "$RUNS2" = "$JOB2 " ] && [ "$SAME" = 1 ] && [ "$RANKS" = 2 ] \
   && grep -q "global batch size 8 over 2 processes: 4 per device" "$RUN2/train.log"; then
    pass "step 2: DDP job $JOB2 $STATE2 on 2 ranks; one run folder (runs/$RUNS2); logged val/mse=$MSE2 val/loss=$LOSS2 = 1-process validation of last.ckpt ($MSE_1P, $LOSS_1P); $STEPS2 optimizer steps"
else
    fail "step 2: state=$STATE2 runs=[$RUNS2] ranks=$RANKS val/mse ddp=$MSE2 1p=$MSE_1P val/loss ddp=$LOSS2 1p=$LOSS_1P"
    tail -40 "$WORK/job-$JOB2.out"
fi

# ------------------------------------------- 3. preemption: USR1, requeue, resume
say "step 3: same job, scancel --signal=USR1 after its first epoch"
JOB3=$("${SBATCH[@]}" --output="$WORK/job-%j.out" scripts/slurm/train.sbatch "${TINY[@]}" "${DDP[@]}")
RUN3=$WORK/logs/train/runs/$JOB3
for _ in $(seq 240); do
    [ -f "$RUN3/checkpoints/last.ckpt" ] && break
    sleep 0.5
done
scancel --signal=USR1 "$JOB3" && say "sent USR1 to job $JOB3 ($(job_state "$JOB3"))"
for _ in $(seq 120); do  # wait for the requeue
    [ "$(job_field "$JOB3" Restarts)" -ge 1 ] 2>/dev/null && [ "$(job_state "$JOB3")" = PENDING ] && break
    sleep 0.5
done
# SLURM holds a requeued job for ~2 minutes (Reason=BeginTime); skip the wait in this test.
[ "$(job_field "$JOB3" Reason)" = BeginTime ] && scontrol update JobId="$JOB3" StartTime=now
say "job $JOB3: $(job_state "$JOB3"), Restarts=$(job_field "$JOB3" Restarts), Reason=$(job_field "$JOB3" Reason)"
STATE3=$(wait_done "$JOB3" 300)
HPC=$(ls "$RUN3"/hpc_ckpt_*.ckpt 2>/dev/null | head -1)
HPC_STEP=$(global_step "$HPC" 2>/dev/null)
STEPS3=$(global_step "$RUN3/checkpoints/last.ckpt" 2>/dev/null)
RESTARTS=$(job_field "$JOB3" Restarts)
RUNS3=$(ls "$WORK/logs/train/runs" | tr '\n' ' ')
if [ "$STATE3" = COMPLETED ] && [ -n "$HPC" ] && [ "${RESTARTS:-0}" -ge 1 ] \
   && grep -q "resuming from $HPC" "$WORK/job-$JOB3.out" \
   && [ -n "$STEPS3" ] && [ "$STEPS3" = "$STEPS2" ] && [ "$RUNS3" = "$JOB2 $JOB3 " ]; then
    pass "step 3: job $JOB3 saved $(basename "$HPC") at step $HPC_STEP, requeued (Restarts=$RESTARTS), resumed from it and ended $STATE3 after $STEPS3 optimizer steps (uninterrupted job 2: $STEPS2); one run folder"
else
    fail "step 3: state=$STATE3 hpc=$HPC (step $HPC_STEP) restarts=$RESTARTS steps=$STEPS3 vs $STEPS2 runs=[$RUNS3]"
    tail -60 "$WORK/job-$JOB3.out"
fi
grep -E "USR1|SIGUSR1|saved .*hpc_ckpt|requeued SLURM|resuming from|^job " "$WORK/job-$JOB3.out" | sed 's/^/    /'

if [ "$FAILED" = 0 ]; then say "ALL PASS (work dir $WORK)"; else say "SOME STEPS FAILED (work dir $WORK)"; fi
exit "$FAILED"
