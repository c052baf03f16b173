#!/usr/bin/env bash
# Slurm: tools/slurm_train.sh PARTITION JOB_NAME GPUS [Hydra overrides]  (GPUS_PER_NODE=8 by default)
# srun starts one process per GPU; mmengine's slurm launcher reads SLURM_* for ranks and the master.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTITION=$1 JOB_NAME=$2 GPUS=$3; shift 3
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PY=${PY:-.venv/bin/python}
if ! printf '%s\n' "$@" | grep -q '^work_dir='; then
  set -- "$@" "work_dir=work_dirs/${JOB_NAME}_$(date +%Y%m%d_%H%M%S)"
fi
exec srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" \
  --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="${CPUS_PER_TASK:-5}" --kill-on-bad-exit=1 \
  "$PY" -u tools/train.py launcher=slurm "$@"
