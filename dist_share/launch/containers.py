"""Horovod over Gloo without horovodrun (containers that cannot ssh to each other): each rank's
environment, the rendezvous server and its key-value store, and a rank that reports its exit."""

from __future__ import annotations

import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from dist_share.errors import ConfigError
from dist_share.launch.hosts import Host, total_slots
from dist_share.launch.supervise import run


def gloo_slot_env(
    hosts: Sequence[Host], rank: int, rendezvous_addr: str, rendezvous_port: int, iface: str
) -> dict[str, str]:
    """The environment horovodrun --gloo would give ``rank``: its place in the host plan plus
    where the rendezvous server is. Ranks fill hosts in order, like horovodrun's plan."""
    size = total_slots(hosts)
    if not 0 <= rank < size:
        raise ConfigError(
            "--rank",
            f"rank {rank} is not in range(0, {size}) for hosts {','.join(map(str, hosts))}",
        )
    owners = [(i, local) for i, h in enumerate(hosts) for local in range(h.slots)]
    host_index, local_rank = owners[rank]
    host = hosts[host_index]
    cross = [i for i, h in enumerate(hosts) if h.slots > local_rank]
    return {
        "HOROVOD_HOSTNAME": host.name,
        "HOROVOD_RANK": str(rank),
        "HOROVOD_SIZE": str(size),
        "HOROVOD_LOCAL_RANK": str(local_rank),
        "HOROVOD_LOCAL_SIZE": str(host.slots),
        "HOROVOD_CROSS_RANK": str(cross.index(host_index)),
        "HOROVOD_CROSS_SIZE": str(len(cross)),
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": rendezvous_addr,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(rendezvous_port),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_IFACE": iface,
        "NCCL_SOCKET_IFNAME": iface,
    }


def kv_put(url: str, value: str, timeout: float) -> None:
    """Store ``value`` under ``url`` in a rendezvous server's key-value store."""
    req = urllib.request.Request(url, data=value.encode(), method="PUT")
    urllib.request.urlopen(req, timeout=timeout).close()


def kv_get(url: str, timeout: float = 120.0) -> str:
    """The value under ``url``, waiting up to ``timeout`` s while it is not there yet (404)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.read().decode()
        except urllib.error.HTTPError as e:
            if e.code != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# Where each rank's exit code goes. An ad-hoc scope: Horovod's own scopes (global, local_*,
# cross_*) are cleared by the server when their ranks finish the Gloo rendezvous.
EXIT_SCOPE = "dist_share_exit"


def serve_rendezvous(
    hosts: Sequence[Host], port: int, ready: Callable[[int], None] | None = None
) -> int:
    """Run the HTTP rendezvous that horovodrun --gloo would start, on a fixed port, for as long
    as the job runs; return the job's exit code.

    Uses Horovod's own server (pinned Horovod 0.28.1), so the workers see exactly what
    horovodrun gives them; only the ssh-based process start is replaced. What horovodrun also
    does, and a compose file cannot, is wait for every rank and exit with the job's status: here
    each rank reports its exit code (`run_rank`), and the server stops once all have reported.
    Its own exit code is then 0 if every rank succeeded, else the first failing rank's. So the
    rendezvous lives as long as the job, and `compose up --abort-on-container-failure` needs no
    container to be stopped when all goes well (``--abort-on-container-exit`` stops rank 0 as
    soon as any other rank exits first). SIGTERM/SIGINT stop it with 128 + the signal.
    """
    from horovod.runner.common.util.hosts import get_host_assignments
    from horovod.runner.common.util.hosts import parse_hosts as hvd_hosts
    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

    size = total_slots(hosts)
    plan = get_host_assignments(hvd_hosts(",".join(map(str, hosts))), size)
    server = RendezvousHTTPServer(("", port), RendezvousHandler, 0)
    server.init(plan)
    stop = threading.Event()
    signals: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        signals.append(signum)
        stop.set()

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=server.serve_forever, name="rendezvous", daemon=True)
    thread.start()
    if ready is not None:
        ready(server.server_address[1])
    codes: dict[int, int] = {}
    try:
        while len(codes) < size and not stop.wait(0.2):
            with server.cache_lock:
                reported = dict(server.cache.get(EXIT_SCOPE, {}))
            for rank, value in sorted(reported.items()):
                if int(rank) not in codes:
                    codes[int(rank)] = int(value)
                    print(f"rendezvous: rank {rank} exited with code {int(value)}", flush=True)
    finally:
        server.shutdown()
        server.server_close()
        for s, handler in old.items():
            signal.signal(s, handler)
    if signals:
        print(f"rendezvous: stopped by {signal.Signals(signals[0]).name}", flush=True)
        return 128 + signals[0]
    failed = [code for _, code in sorted(codes.items()) if code != 0]
    code = failed[0] if failed else 0
    print(f"rendezvous: all {size} ranks have exited; job exit code {code}", flush=True)
    return code


def run_rank(argv: Sequence[str], rendezvous: str, rank: int) -> int:
    """Run one rank's command (`run`: SIGTERM reaches it, so a stopped container still saves),
    then report its exit code to the rendezvous, which exits once every rank has reported."""
    code = run(argv)
    try:
        kv_put(f"http://{rendezvous}/{EXIT_SCOPE}/{rank}", str(code), timeout=10)
    except OSError as e:
        # The rendezvous is gone (stopped with the job): nobody waits for this report.
        print(
            f"rank {rank}: could not report exit code {code} to {rendezvous}: {e}", file=sys.stderr
        )
    return code
