# shellcheck shell=bash
# Sourced by the launch scripts. `run CMD...` executes CMD, or with DRY_RUN=1 prints it as one
# shell-quoted line (exactly what would run, quoted like Python's shlex.join) and returns.
# MAX_RESTARTS=K relaunches a job that failed (exit 1, 3 or killed by a signal) up to K times,
# after RESTART_BACKOFF (default 5) seconds, doubling up to 120; the trainer resumes from the
# last checkpoint. Like `dist-share launch --max-restarts K`. 2, 4, 75 and 130 end at once.
DRY_RUN="${DRY_RUN:-0}"
DIST_SHARE="${DIST_SHARE:-dist-share}"   # the CLI; e.g. /opt/venv/bin/dist-share
MAX_RESTARTS="${MAX_RESTARTS:-0}"
RESTART_BACKOFF="${RESTART_BACKOFF:-5}"

quote() {
  case "$1" in
    '' | *[!A-Za-z0-9_@%+=:,./-]*) printf "'%s'" "${1//\'/\'\"\'\"\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}

run() {
  if [ "$DRY_RUN" = 1 ]; then
    local out="" arg
    for arg in "$@"; do out+="$(quote "$arg") "; done
    printf '%s\n' "${out% }"
  elif [ "$MAX_RESTARTS" = 0 ]; then
    exec "$@"
  else
    run_with_restarts "$@"
  fi
}

run_with_restarts() {
  local attempt=0 delay="$RESTART_BACKOFF" code
  while true; do
    code=0
    "$@" || code=$?
    case "$code" in
      0 | 2 | 4 | 75 | 130) return "$code" ;;
    esac
    if [ "$code" -gt 128 ]; then code=3; fi   # killed by a signal: a lost rank
    if [ "$code" != 1 ] && [ "$code" != 3 ]; then return "$code"; fi
    if [ "$attempt" -ge "$MAX_RESTARTS" ]; then
      printf '%s: giving up after %s restart(s); last exit code %s\n' "$(basename "$0")" "$MAX_RESTARTS" "$code" >&2
      return "$code"
    fi
    attempt=$((attempt + 1))
    printf '%s: job failed with exit code %s; restart %s/%s in %s s (resumes from the last checkpoint)\n' \
      "$(basename "$0")" "$code" "$attempt" "$MAX_RESTARTS" "$delay" >&2
    sleep "$delay"
    delay=$((delay * 2 > 120 ? 120 : delay * 2))
  done
}

die() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 2; }

# Appends `-x NAME` to the array named by $1 for each variable every MPI rank needs that is set
# (only those: Open MPI warns about the others), then every NCCL_* and HOROVOD_* variable sorted
# by name, as dist_share/launch/commands.py does; with IFACE set, the two it passes by value are
# left out.
mpi_forward_env() {
  local -n into="$1"
  local var fixed=(PATH LD_LIBRARY_PATH PYTHONPATH NCCL_DEBUG TF_CPP_MIN_LOG_LEVEL CUDA_VISIBLE_DEVICES)
  for var in "${fixed[@]}"; do
    if [ -n "${!var+x}" ]; then into+=(-x "$var"); fi
  done
  while IFS= read -r var; do
    case " ${fixed[*]} " in *" $var "*) continue ;; esac
    if [ -n "${IFACE:-}" ] && { [ "$var" = NCCL_SOCKET_IFNAME ] || [ "$var" = HOROVOD_GLOO_IFACE ]; }; then
      continue
    fi
    into+=(-x "$var")
  done < <(compgen -e | grep -E '^(NCCL_|HOROVOD_)' | LC_ALL=C sort)
}

# The GPUs of this node (0 without nvidia-smi or a GPU): the default process count per node.
gpus_on_this_node() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}
