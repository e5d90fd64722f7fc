#!/usr/bin/env bash
# MultiWorkerMirroredStrategy across nodes: run this script on EVERY node, the same WORKERS list
# everywhere and each node's own INDEX. Each worker uses all GPUs it sees (MirroredStrategy
# inside the node, collective all-reduce across nodes). Worker 0 is the chief (logs, checkpoints).
#
#   INDEX=0 launch/multiworker.sh [--dry-run] [extra dist-share train options]   # on node1
#   INDEX=1 launch/multiworker.sh [--dry-run] [extra dist-share train options]   # on node2
#
# Variables (environment):
#   WORKERS  host:port of every worker, comma separated  (default node1:23456,node2:23456)
#   INDEX    this node's position in WORKERS              (required)
#   CONFIG, RUN_DIR (on a shared file system), DRY_RUN=1
# Under Slurm use launch/slurm_multiworker.sbatch instead (TF_CONFIG comes from Slurm's env).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi

CONFIG="${CONFIG:-configs/siamese_digits.yaml}"
RUN_DIR="${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)-multiworker}"
WORKERS="${WORKERS:-node1:23456,node2:23456}"
[ -n "${INDEX:-}" ] || die "set INDEX to this node's position in WORKERS ($WORKERS)"
IFS=, read -ra workers <<<"$WORKERS"
if ! [[ "$INDEX" =~ ^[0-9]+$ ]] || [ "$INDEX" -ge "${#workers[@]}" ]; then
  die "INDEX $INDEX is not in 0..$((${#workers[@]} - 1))"
fi
list=""
for w in "${workers[@]}"; do list+="${list:+, }\"$w\""; done
TF_CONFIG="{\"cluster\": {\"worker\": [$list]}, \"task\": {\"type\": \"worker\", \"index\": $INDEX}}"

run env "TF_CONFIG=$TF_CONFIG" "$DIST_SHARE" train "$CONFIG" --strategy multiworker --run-dir "$RUN_DIR" "$@"
