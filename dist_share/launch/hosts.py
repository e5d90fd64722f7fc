"""Hosts and slots of a launch: ``node1:4,node2:4`` lists, host files, slot checks, free ports."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dist_share.errors import ConfigError

LOCAL_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int

    def __str__(self) -> str:
        return f"{self.name}:{self.slots}"


def parse_hosts(text: str, key: str = "--hosts") -> list[Host]:
    """``node1:4,node2:4`` (a missing ``:N`` means one slot) -> [Host('node1', 4), ...]."""
    hosts = []
    for item in (p.strip() for p in text.split(",")):
        name, _, slots = item.partition(":")
        if not name or re.search(r"\s", name):
            raise ConfigError(
                key, f"bad host entry {item!r} in {text!r}; expected HOST[:SLOTS],..."
            )
        try:
            n = int(slots) if slots else 1
        except ValueError:
            n = 0
        if n <= 0:
            raise ConfigError(
                key, f"bad slot count in {item!r}; expected a positive integer, e.g. {name}:4"
            )
        hosts.append(Host(name, n))
    names = [h.name for h in hosts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(key, f"host {dup[0]!r} is listed more than once in {text!r}")
    return hosts


def read_hostfile(path: str | os.PathLike) -> list[Host]:
    """An Open MPI / Horovod host file: ``node1 slots=4`` (or ``node1:4``) per line, # comments."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError("--hostfile", f"cannot read {path}: {e.strerror or e}") from None
    entries = []
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)(\s+.*)?", line)
        entries.append(f"{m.group(1)}:{m.group(2)}" if m else line)
    if not entries:
        raise ConfigError("--hostfile", f"{path} lists no hosts")
    return parse_hosts(",".join(entries), "--hostfile")


def total_slots(hosts: Sequence[Host]) -> int:
    return sum(h.slots for h in hosts)


def check_np(hosts: Sequence[Host], num_proc: int | None) -> int:
    slots = total_slots(hosts)
    n = slots if num_proc is None else num_proc
    if n <= 0 or n > slots:
        raise ConfigError(
            "-np",
            f"asked for {n} processes but the hosts {','.join(map(str, hosts))} have {slots} slots",
        )
    return n


def is_local(host: str) -> bool:
    return host in LOCAL_NAMES or host == socket.gethostname()


def free_port(host: str = "", count: int = 1) -> int:
    """A TCP port free now on ``host`` ("" = every interface, for workers other hosts reach).

    With ``count`` > 1, the first of ``count`` consecutive free ports (a multiworker
    ``--base-port``: the workers on one host take consecutive ports, and the port after a free
    one may be another connection's).
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        ports = range(base + 1, base + count)
        if base + count - 1 <= 65535 and not any(bind_error(host, p) for p in ports):
            return base
    raise OSError(f"no {count} consecutive free ports found on {host or 'this host'}")


def bind_error(host: str, port: int) -> OSError | None:
    """Why ``port`` cannot be bound now, or None (TIME_WAIT does not count as in use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e
    return None
