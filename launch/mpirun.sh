#!/usr/bin/env bash
# Horovod under Open MPI's mpirun (the MPI controller instead of Gloo), one or several nodes.
# Flags as the Horovod docs recommend: no core binding (Horovod threads), slot mapping, and no
# openib BTL; -x forwards the environment every rank needs.
#
#   launch/mpirun.sh [--dry-run] [extra dist-share train options]
#
# Variables (environment):
#   HOSTS      host:slots,... (slots = GPUs per node)  (default localhost:2)
#   NP         total processes                          (default: sum of slots)
#   IFACE      NIC for MPI/NCCL traffic                 (default: let Open MPI choose)
#   CONFIG, RUN_DIR, DRY_RUN=1
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi

CONFIG="${CONFIG:-configs/siamese_digits.yaml}"
RUN_DIR="${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)-horovod}"
HOSTS="${HOSTS:-localhost:2}"
if [ -z "${NP:-}" ]; then
  NP=0
  IFS=, read -ra entries <<<"$HOSTS"
  for entry in "${entries[@]}"; do
    slots="${entry#*:}"; [ "$slots" = "$entry" ] && slots=1
    NP=$((NP + slots))
  done
fi
mpi=(mpirun -np "$NP" -H "$HOSTS" -bind-to none -map-by slot -mca pml ob1 -mca btl '^openib')
[ "$(id -u)" -eq 0 ] && mpi+=(--allow-run-as-root)
# A waiting rank yields its core (its peer may need it): docs/PERFORMANCE.md, launchers.
mpi+=(-mca mpi_yield_when_idle 1)
if [ -n "${IFACE:-}" ]; then
  mpi+=(-mca btl_tcp_if_include "$IFACE" -mca oob_tcp_if_include "$IFACE"
        -x "NCCL_SOCKET_IFNAME=$IFACE" -x "HOROVOD_GLOO_IFACE=$IFACE")
fi
# Forward what every rank needs, NCCL's and Horovod's settings included (common.sh).
mpi_forward_env mpi

run "${mpi[@]}" "$DIST_SHARE" train "$CONFIG" --strategy horovod --run-dir "$RUN_DIR" "$@"
