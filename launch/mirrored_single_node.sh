#!/usr/bin/env bash
# One node, all of its GPUs, one process: tf.distribute.MirroredStrategy.
#
#   launch/mirrored_single_node.sh [--dry-run] [extra dist-share train options]
#
# Variables (environment):
#   CONFIG   config file                       (default configs/siamese_digits.yaml)
#   RUN_DIR  run directory                     (default runs/<config>-mirrored)
#   GPUS     GPUs to use, e.g. 0,1,2,3         (default: every visible GPU)
#   CPU_DEVICES  no GPU: split the CPU into N logical devices instead (testing only)
#   DRY_RUN=1    print the command instead of running it
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi

CONFIG="${CONFIG:-configs/siamese_digits.yaml}"
RUN_DIR="${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)-mirrored}"
extra=()
if [ -n "${GPUS:-}" ]; then export CUDA_VISIBLE_DEVICES="$GPUS"; fi
if [ -n "${CPU_DEVICES:-}" ]; then extra+=(--set "strategy.num_cpu_devices=$CPU_DEVICES"); fi

run "$DIST_SHARE" train "$CONFIG" --strategy mirrored --run-dir "$RUN_DIR" ${extra[@]+"${extra[@]}"} "$@"
