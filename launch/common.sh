# shellcheck shell=bash
# Sourced by the launch scripts. `run CMD...` executes CMD, or with DRY_RUN=1 prints it as one
# shell-quoted line (exactly what would run, quoted like Python's shlex.join) and returns.
DRY_RUN="${DRY_RUN:-0}"
DIST_SHARE="${DIST_SHARE:-dist-share}"   # the CLI; e.g. /opt/venv/bin/dist-share

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
  else
    exec "$@"
  fi
}

die() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 2; }
