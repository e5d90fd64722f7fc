#!/usr/bin/env bash
# One node, NP Horovod processes (one per GPU), started by horovodrun.
#
#   launch/horovod_single_node.sh [--dry-run] [extra dist-share train options]
#
# Variables (environment):
#   CONFIG     config file                    (default configs/siamese_digits.yaml)
#   RUN_DIR    run directory                  (default runs/<config>-horovod)
#   NP         processes                      (default: the GPUs of this node, 2 without GPUs)
#   TRANSPORT  gloo | mpi                     (default gloo: no MPI needed at run time)
#   DRY_RUN=1  print the command instead of running it
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi

CONFIG="${CONFIG:-configs/siamese_digits.yaml}"
RUN_DIR="${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)-horovod}"
if [ -z "${NP:-}" ]; then
  NP="$(gpus_on_this_node)"
  if [ "$NP" = 0 ]; then NP=2; fi
fi
TRANSPORT="${TRANSPORT:-gloo}"
case "$TRANSPORT" in gloo|mpi) ;; *) die "TRANSPORT must be gloo or mpi, got '$TRANSPORT'" ;; esac

run horovodrun -np "$NP" -H "localhost:$NP" "--$TRANSPORT" \
  "$DIST_SHARE" train "$CONFIG" --strategy horovod --run-dir "$RUN_DIR" "$@"
