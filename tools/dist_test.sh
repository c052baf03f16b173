#!/usr/bin/env bash
# Multi-process evaluation of a checkpoint with torchrun (predictions gathered from all ranks):
#   tools/dist_test.sh NPROC checkpoint=PATH [Hydra overrides]
# Multi-node, PORT and INSTSEG_DIST_TIMEOUT as in tools/dist_train.sh.
TOOL=test exec "$(dirname "$0")/dist_train.sh" "$@"
