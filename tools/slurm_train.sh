#!/usr/bin/env bash
# Slurm without Hydra's submitit launcher, as mmdet's tools/slurm_train.sh:
#   tools/slurm_train.sh PARTITION JOB_NAME GPUS [Hydra overrides]     (GPUS_PER_NODE=8 by default)
# srun starts one task per GPU; each joins the process group from SLURM_* (instseg/engine/dist.py),
# all share rank 0's work_dir. CPU nodes: GPUS_PER_NODE=0 TASKS_PER_NODE=N (gloo).
set -euo pipefail
PARTITION=${1:?usage: tools/slurm_train.sh PARTITION JOB_NAME GPUS [overrides]}
JOB_NAME=${2:?usage: tools/slurm_train.sh PARTITION JOB_NAME GPUS [overrides]}
GPUS=${3:?usage: tools/slurm_train.sh PARTITION JOB_NAME GPUS [overrides]}
shift 3
cd "$(dirname "$0")/.."
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TASKS_PER_NODE=${TASKS_PER_NODE:-$GPUS_PER_NODE}
PY=${PY:-.venv/bin/python}
exec srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" \
  --ntasks-per-node="$TASKS_PER_NODE" --cpus-per-task="${CPUS_PER_TASK:-5}" --kill-on-bad-exit=1 \
  ${SRUN_ARGS:-} "$PY" -u tools/train.py "$@"
