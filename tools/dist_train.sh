#!/usr/bin/env bash
# Multi-GPU training with torchrun: tools/dist_train.sh GPUS [Hydra overrides]
# Multi-node: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host tools/dist_train.sh 8 work_dir=SHARED_DIR ...
# Every process must write to one work_dir, so it is fixed here (multi-node: pass work_dir=).
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${1:?usage: tools/dist_train.sh GPUS [overrides]}; shift
PY=${PY:-.venv/bin/python}
if ! printf '%s\n' "$@" | grep -q '^work_dir='; then
  set -- "$@" "work_dir=work_dirs/dist_$(date +%Y%m%d_%H%M%S)"
fi
exec "$PY" -m torch.distributed.run --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" --nproc_per_node="$GPUS" \
  tools/train.py launcher=pytorch "$@"
