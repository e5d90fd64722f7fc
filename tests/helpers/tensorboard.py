"""A real TensorBoard on a loopback port, its HTTP API, and a page of it in headless Chromium."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from dist_share.launch.supervise import kill_process_group
from tests.helpers.paths import EXE

__all__ = ["Page", "Server", "api", "live_processes", "render", "serve"]

TENSORBOARD = Path(EXE).with_name("tensorboard")
# Debian's package (the set-up installs it); its launcher script execs /usr/lib/chromium.
CHROMIUM = "chromium"
# TensorBoard prints this once its HTTP server listens (``--port 0``: the port the OS chose).
_LISTENING = re.compile(r"TensorBoard \S+ at (http://127\.0\.0\.1:\d+)/")


@dataclass(frozen=True)
class Server:
    url: str  # http://127.0.0.1:PORT, no trailing slash
    pid: int  # leads the process group of TensorBoard and its data server


@dataclass(frozen=True)
class Page:
    dom: str  # the document's outerHTML once `ready` held
    screenshot: Path  # PNG of the viewport at that moment
    pid: int  # led the process group of Chromium's processes
    home: str  # its temporary directory (removed), on every command line of its crash handlers


def _tail(log: IO[bytes], limit: int = 6000) -> str:
    """The last `limit` bytes a child wrote to `log` (pread: the child shares the file offset)."""
    size = os.fstat(log.fileno()).st_size
    return os.pread(log.fileno(), limit, max(0, size - limit)).decode(errors="replace")


def live_processes(pgid: int | None = None, mentioning: str | None = None) -> list[psutil.Process]:
    """The processes still there (zombies are not) of process group `pgid`, or whose command
    line mentions `mentioning`."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if (
                (pgid is not None and os.getpgid(proc.pid) == pgid)
                or (mentioning is not None and any(mentioning in a for a in proc.cmdline()))
            ) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


@contextlib.contextmanager
def serve(logdir: str | os.PathLike, timeout: float = 120.0) -> Iterator[Server]:
    """``tensorboard --logdir LOGDIR`` on 127.0.0.1 and a port the OS picks (``--port 0``; the
    port is read from the line TensorBoard prints), in its own process group. Yields once its
    HTTP server answers; on exit SIGTERM, then SIGKILL after 10 s, to the whole group (the
    Rust data server too), and waits for it. Its output goes to a file, not a pipe nobody reads
    (the profile plugin logs every request)."""
    argv = [str(TENSORBOARD), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            url = None
            while True:
                if url is None:
                    found = _LISTENING.search(_tail(log, 1 << 20))
                    url = found.group(1) if found else None
                if url is not None:
                    with contextlib.suppress(OSError):
                        urllib.request.urlopen(url + "/data/logdir", timeout=5).close()
                        break
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"tensorboard exited with code {proc.returncode} before it answered:\n"
                        f"{_tail(log)}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"tensorboard did not answer in {timeout:.0f} s (url {url}):\n{_tail(log)}"
                    )
                time.sleep(0.2)
            yield Server(url, proc.pid)
        finally:
            kill_process_group(proc)


def api(server: Server, route: str, timeout: float = 30.0, **params: str) -> Any:
    """GET ``route`` (e.g. "/data/runs") of TensorBoard's HTTP API with query `params`: its JSON.
    (Plain urllib: it asks for no compression, and TensorBoard sends none then.)"""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    try:
        with urllib.request.urlopen(server.url + route + query, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        raise AssertionError(f"GET {route}{query}: HTTP {e.code} {e.read()[:500]!r}") from None


class _DevTools:
    """The DevTools protocol over ``--remote-debugging-pipe``: JSON messages ended by NUL,
    commands to Chromium's fd 3, answers and events from its fd 4."""

    def __init__(self, commands: int, answers: int, deadline: float) -> None:
        self.commands, self.answers, self.deadline = commands, answers, deadline
        self.buffer = b""
        self.last_id = 0

    def call(self, method: str, session: str | None = None, **params: Any) -> dict:
        self.last_id += 1
        message: dict[str, Any] = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self.last_id:  # else an event: not needed here
                    if "error" in answer:
                        raise RuntimeError(f"chromium: {method}: {answer['error']}")
                    return answer["result"]
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"chromium did not answer {method} in time")
            if select.select([self.answers], [], [], left)[0]:
                chunk = os.read(self.answers, 1 << 20)
                if not chunk:
                    raise EOFError(f"chromium closed its DevTools pipe during {method}")
                self.buffer += chunk

    def evaluate(self, session: str, expression: str) -> Any:
        result = self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
        return result["result"].get("value")


def render(
    url: str,
    screenshot: str | os.PathLike,
    ready: str,
    timeout: float = 90.0,
    size: tuple[int, int] = (1280, 900),
) -> Page:
    """Open `url` in headless Chromium (a fresh profile, its own process group), wait until the
    JavaScript expression `ready` is true in the page, then save a PNG of the viewport to
    `screenshot` and return the DOM. Chromium is closed, and its group killed, whatever happens.

    Chromium's crash handlers leave its process group (they call setsid); with XDG_CONFIG_HOME
    in its temporary directory they keep their database there rather than in ~/.config, and
    they are found by that directory's name on their command line, waited for and killed too.

    Not ``--dump-dom``/``--screenshot`` with ``--virtual-time-budget``: the page's charts are
    drawn when an IntersectionObserver sees them, which runs on rendered frames that virtual
    time outpaces, so those captured the chart card empty about one time in four. Here the
    page is polled in real time, through the DevTools protocol on a pipe (no port, no library).
    """
    if shutil.which(CHROMIUM) is None:
        raise RuntimeError(f"{CHROMIUM} not found; it is Debian's package, ./bootstrap setup")
    width, height = size
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="chromium-") as home, tempfile.TemporaryFile() as log:
        argv = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", f"--user-data-dir={home}/profile", f"--window-size={width},{height}",
            "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        env = dict(os.environ, XDG_CONFIG_HOME=f"{home}/config")
        to_chromium, commands = os.pipe()
        answers, from_chromium = os.pipe()
        # The pipe ends come in as stdin and stdout; the shell moves them to fds 3 and 4, where
        # Chromium looks for them (dash takes one-digit fd numbers only), and its output to log.
        shell = 'exec "$@" 3<&0 4>&1 0</dev/null 1>&2'
        proc = subprocess.Popen(["/bin/sh", "-c", shell, "sh", *argv], stdin=to_chromium,
                                stdout=from_chromium, stderr=log, env=env,
                                start_new_session=True)  # fmt: skip
        os.close(to_chromium)
        os.close(from_chromium)
        devtools = _DevTools(commands, answers, deadline)
        try:
            target = devtools.call("Target.createTarget", url="about:blank")["targetId"]
            session = devtools.call("Target.attachToTarget", targetId=target, flatten=True)[
                "sessionId"
            ]
            devtools.call("Emulation.setDeviceMetricsOverride", session, width=width,
                          height=height, deviceScaleFactor=1, mobile=False)  # fmt: skip
            devtools.call("Page.navigate", session, url=url)
            while not devtools.evaluate(session, f"Boolean({ready})"):
                if time.monotonic() > deadline - 5:
                    text = devtools.evaluate(session, "document.body && document.body.innerText")
                    raise TimeoutError(
                        f"{url}: not ready in {timeout:.0f} s ({ready}); the page says:\n"
                        f"{str(text)[:3000]}"
                    )
                time.sleep(0.2)
            png = devtools.call("Page.captureScreenshot", session, format="png")["data"]
            Path(screenshot).write_bytes(base64.b64decode(png))
            dom = devtools.evaluate(session, "document.documentElement.outerHTML")
            with contextlib.suppress(EOFError):  # it may close the pipe before it answers
                devtools.call("Browser.close")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        except (OSError, EOFError, RuntimeError, TimeoutError) as e:
            raise RuntimeError(
                f"headless chromium failed: {e}\n--- its output ---\n{_tail(log)}"
            ) from e
        finally:
            os.close(commands)
            os.close(answers)
            kill_process_group(proc)  # what is left of its group (at once if nothing)
            _end_crash_handlers(home)
        return Page(dom, Path(screenshot), proc.pid, home)


def _end_crash_handlers(home: str, grace: float = 10.0) -> None:
    """Wait for the crash handlers of the Chromium of `home` to end (they do once it has),
    SIGKILL them after `grace` seconds."""
    deadline = time.monotonic() + grace
    while (left := live_processes(mentioning=home)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
