#!/usr/bin/env bash
# Multi-process training with torchrun, as mmdet's tools/dist_train.sh:
#   tools/dist_train.sh NPROC [Hydra overrides]     NPROC processes: one per GPU (NCCL), or CPU processes (gloo)
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=HOST PORT=29500 tools/dist_train.sh NPROC ...   on each node
# All ranks share rank 0's work_dir (time-stamped unless work_dir= is given); rank 0 alone writes it.
# PORT: a free one is picked on a single node; give it with NNODES>1 (every node must use the same).
# INSTSEG_DIST_TIMEOUT=SECONDS: how long a rank waits for the others before the job fails (1800).
set -euo pipefail
TOOL=${TOOL:-train}  # tools/dist_test.sh runs tools/test.py this way
NPROC=${1:?usage: tools/dist_$TOOL.sh NPROC [Hydra overrides]}; shift
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NNODES=${NNODES:-1}
if [ -z "${PORT:-}" ]; then
  if [ "$NNODES" -gt 1 ]; then
    echo "error: PORT=... is required with NNODES=$NNODES (the same free port on every node)" >&2
    exit 2
  fi
  PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
fi
exec "$PY" -m torch.distributed.run --nnodes="$NNODES" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="$PORT" --nproc_per_node="$NPROC" \
  "tools/$TOOL.py" "$@"
