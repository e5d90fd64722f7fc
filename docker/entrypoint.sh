#!/usr/bin/env bash
# Entrypoint of the dist_share images. DIST_SHARE_ROLE picks what the container is:
#
#   (unset)     run the command as given                   (default CMD: dist-share --help)
#   rendezvous  serve Horovod's Gloo rendezvous (what horovodrun --gloo starts internally) for
#               HOROVOD_HOSTS on HOROVOD_GLOO_RENDEZVOUS_PORT until every rank has reported its
#               exit, then exit with the job's code (0, or the first failing rank's)
#   worker      become Horovod rank DIST_SHARE_RANK of HOROVOD_HOSTS: wait for the rendezvous at
#               HOROVOD_GLOO_RENDEZVOUS_ADDR:HOROVOD_GLOO_RENDEZVOUS_PORT, export the HOROVOD_*
#               variables horovodrun would set (python -m dist_share.launch gloo-env), run
#               the command (SIGTERM passed on to it) and report its exit code to the
#               rendezvous (python -m dist_share.launch run-rank). No ssh between containers.
#   sshd        run sshd in the foreground (workers of a Kubeflow MPIJob, reached by mpirun)
#
# Variables: HOROVOD_HOSTS (host:slots,... e.g. worker0:1,worker1:1), DIST_SHARE_RANK,
#   HOROVOD_GLOO_RENDEZVOUS_ADDR (an IP), HOROVOD_GLOO_RENDEZVOUS_PORT, HOROVOD_GLOO_IFACE
#   (default eth0), RENDEZVOUS_WAIT seconds (default 120), DIST_SHARE_PYTHON (default python).
#   DRY_RUN=1 prints the environment it would set and the command, and runs nothing.
set -euo pipefail

PYTHON="${DIST_SHARE_PYTHON:-python}"

# run/quote/die are the launch scripts' own (launch/common.sh): the image copies launch/ to
# /opt/dist_share/launch; from a checkout it sits beside docker/.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for common in "${DIST_SHARE_HOME:-/opt/dist_share}/launch/common.sh" "$here/../launch/common.sh"; do
  # shellcheck source=launch/common.sh
  [ -f "$common" ] && { . "$common"; break; }
done
declare -F run >/dev/null || { echo "dist-share-entrypoint: launch/common.sh not found" >&2; exit 2; }

need() {
  local name
  for name in "$@"; do [ -n "${!name:-}" ] || die "DIST_SHARE_ROLE=$ROLE needs $name"; done
}

wait_for() {  # host port seconds: until a TCP connection succeeds
  local deadline=$((SECONDS + $3))
  until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || die "rendezvous $1:$2 not reachable after $3 s"
    sleep 1
  done
}

ROLE="${DIST_SHARE_ROLE:-}"
case "$ROLE" in
  "")
    [ $# -gt 0 ] || set -- dist-share --help
    run "$@"
    ;;
  rendezvous)
    need HOROVOD_HOSTS HOROVOD_GLOO_RENDEZVOUS_PORT
    run "$PYTHON" -m dist_share.launch rendezvous --hosts "$HOROVOD_HOSTS" --port "$HOROVOD_GLOO_RENDEZVOUS_PORT"
    ;;
  worker)
    need HOROVOD_HOSTS DIST_SHARE_RANK HOROVOD_GLOO_RENDEZVOUS_ADDR HOROVOD_GLOO_RENDEZVOUS_PORT
    [ $# -gt 0 ] || die "DIST_SHARE_ROLE=worker needs a command, e.g. dist-share train CONFIG --strategy horovod"
    exports="$("$PYTHON" -m dist_share.launch gloo-env --hosts "$HOROVOD_HOSTS" --rank "$DIST_SHARE_RANK" \
      --rendezvous "$HOROVOD_GLOO_RENDEZVOUS_ADDR:$HOROVOD_GLOO_RENDEZVOUS_PORT" \
      --iface "${HOROVOD_GLOO_IFACE:-eth0}")" || die "cannot compute the Horovod environment"
    eval "$exports"
    if [ "$DRY_RUN" = 1 ]; then
      printf '%s\n' "$exports"
    else
      wait_for "$HOROVOD_GLOO_RENDEZVOUS_ADDR" "$HOROVOD_GLOO_RENDEZVOUS_PORT" "${RENDEZVOUS_WAIT:-120}"
    fi
    run "$PYTHON" -m dist_share.launch run-rank --rank "$DIST_SHARE_RANK" \
      --rendezvous "$HOROVOD_GLOO_RENDEZVOUS_ADDR:$HOROVOD_GLOO_RENDEZVOUS_PORT" -- "$@"
    ;;
  sshd)
    run /usr/sbin/sshd -De
    ;;
  *)
    die "unknown DIST_SHARE_ROLE '$ROLE' (expected rendezvous, worker, sshd or unset)"
    ;;
esac
