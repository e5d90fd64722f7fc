#!/usr/bin/env bash
# Several nodes, Horovod, started by horovodrun from ONE node over ssh (passwordless ssh between
# the nodes, the same venv and checkout path on every node, a shared or identical data path).
#
#   launch/horovod_multi_node.sh [--dry-run] [extra dist-share train options]
#
# Variables (environment):
#   HOSTFILE   lines "node1 slots=4" (slots = GPUs per node)   (default launch/hostfile.example)
#   NP         total processes                                  (default: sum of slots)
#   IFACE      NIC the nodes reach each other on, e.g. eth0, ib0 (default eth0)
#   SSH_PORT   sshd port on the nodes                            (default 22)
#   TRANSPORT  gloo | mpi                                        (default gloo)
#   CONFIG, RUN_DIR (run directory on the shared file system), DRY_RUN=1
set -euo pipefail
HERE="$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi

CONFIG="${CONFIG:-configs/siamese_digits.yaml}"
RUN_DIR="${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)-horovod}"
HOSTFILE="${HOSTFILE:-$HERE/hostfile.example}"
IFACE="${IFACE:-eth0}"
SSH_PORT="${SSH_PORT:-22}"
TRANSPORT="${TRANSPORT:-gloo}"
[ -f "$HOSTFILE" ] || die "HOSTFILE $HOSTFILE does not exist"
if [ -z "${NP:-}" ]; then
  NP="$(awk '!/^[[:space:]]*(#|$)/ { n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { split($i, a, "="); n = a[2] } s += n } END { print s + 0 }' "$HOSTFILE")"
fi

run horovodrun -np "$NP" --hostfile "$HOSTFILE" "--$TRANSPORT" \
  --network-interface "$IFACE" --ssh-port "$SSH_PORT" \
  "$DIST_SHARE" train "$CONFIG" --strategy horovod --run-dir "$RUN_DIR" "$@"
