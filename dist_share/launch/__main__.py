"""``python -m dist_share.launch``: the Gloo rendezvous, a rank's environment and a rank that
reports its exit, for launches without horovodrun (docker/entrypoint.sh)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from dist_share.errors import ConfigError
from dist_share.launch.containers import gloo_slot_env, run_rank, serve_rendezvous
from dist_share.launch.hosts import parse_hosts


def _rendezvous_address(text: str) -> tuple[str, int]:
    addr, _, port = text.rpartition(":")
    if not addr or not port.isdigit():
        raise ConfigError("--rendezvous", f"got {text!r}, expected ADDR:PORT")
    return addr, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dist_share.launch",
        description="Horovod/Gloo rendezvous for launches without horovodrun",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser(
        "rendezvous",
        help="serve the Gloo rendezvous for HOSTS on PORT until every rank has reported its "
        "exit; exit with the job's code",
    )
    p.add_argument("--hosts", required=True)
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("gloo-env", help="print 'export K=V' lines for one rank")
    p.add_argument("--hosts", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--rendezvous", required=True, help="ADDR:PORT of the rendezvous server")
    p.add_argument("--iface", default="eth0", help="network interface for Gloo (lo on one machine)")
    p = sub.add_parser(
        "run-rank", help="run COMMAND as RANK, then report its exit code to the rendezvous"
    )
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--rendezvous", required=True, help="ADDR:PORT of the rendezvous server")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "run-rank":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not command:
                raise ConfigError("run-rank", "needs a command after --")
            addr, port = _rendezvous_address(args.rendezvous)
            return run_rank(command, f"{addr}:{port}", args.rank)
        hosts = parse_hosts(args.hosts)
        if args.cmd == "rendezvous":
            return serve_rendezvous(
                hosts,
                args.port,
                lambda port: print(f"rendezvous listening on port {port}", flush=True),
            )
        addr, port = _rendezvous_address(args.rendezvous)
        for key, value in gloo_slot_env(hosts, args.rank, addr, port, args.iface).items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
