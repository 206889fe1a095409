"""Start the servers under test on the server core, and read what they use."""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

SERVER_CORE = 0
LOAD_CORE = 1
BENCH_DIR = Path(__file__).resolve().parent

_SIDECAR_LISTENING = re.compile(
    r"listening for webhooks on (\S+) and lookups on (\S+),"
)
_BASELINE_LISTENING = re.compile(r"listening on (\S+)")
_START_TIMEOUT_S = 120.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class StartError(RuntimeError):
    """A server under test exited or stayed silent instead of starting."""


@dataclass
class ServerProcess:
    """A server pinned to the server core; `ready_s` counts from the fork.

    So does `copied_s`, for a sidecar: until then, its lookups read SQLite.
    """

    proc: subprocess.Popen[str]
    lookup_address: str
    webhook_address: str = ""
    ready_s: float = 0.0
    copied_s: float = 0.0
    output: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=50)
    )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        """Resident memory now, from /proc/PID/status."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        if match is None:
            raise StartError(f"no VmRSS for pid {self.pid}: has it exited?")
        return int(match.group(1)) * 1024

    def cpu_seconds(self) -> float:
        """CPU time used so far by all the server's threads, user and system."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        # utime and stime are fields 14 and 15 of stat(5); the split starts at 3.
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Ask for a clean stop, and kill the process if it does not stop."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def start_sidecar(
    db: Path, lookup_listen: str, env: dict[str, str], shops: int
) -> ServerProcess:
    """Run `python -m sidecar serve`; wait until it has its `shops` in memory.

    It answers lookups from the moment /readyz answers 200, but from SQLite
    until it holds its copy of the table: every figure is measured after that.
    """
    full_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SIDECAR_") and key != "NOTIFY_SOCKET"
    }
    full_env.update(env)
    full_env.update(
        {
            "SIDECAR_DB": str(db),
            "SIDECAR_WEBHOOK_LISTEN": "127.0.0.1:0",
            "SIDECAR_LOOKUP_LISTEN": lookup_listen,
            "PYTHONUNBUFFERED": "1",
        }
    )
    started = time.perf_counter()
    proc = subprocess.Popen(
        pinned(SERVER_CORE, [sys.executable, "-m", "sidecar", "serve"]),
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    server = ServerProcess(proc=proc, lookup_address="")
    match = _wait_for_line(server, proc.stderr, _SIDECAR_LISTENING)
    server.webhook_address, server.lookup_address = match.group(1), match.group(2)
    _wait_until_ready(server, "/readyz")
    server.ready_s = time.perf_counter() - started
    _drain(server, proc.stderr)
    _wait_until_copied(server, shops)
    server.copied_s = time.perf_counter() - started
    return server


def start_baseline(body: bytes, listen: str = "127.0.0.1:0") -> ServerProcess:
    """Run the bare aiohttp server that answers `body` to every lookup."""
    started = time.perf_counter()
    script = str(BENCH_DIR / "baseline_server.py")
    proc = subprocess.Popen(
        pinned(
            SERVER_CORE,
            [sys.executable, script, "--listen", listen, "--body", body.decode()],
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    server = ServerProcess(proc=proc, lookup_address="")
    match = _wait_for_line(server, proc.stdout, _BASELINE_LISTENING)
    server.lookup_address = match.group(1)
    server.ready_s = time.perf_counter() - started
    _drain(server, proc.stdout)
    return server


def http_get(address: str, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """One GET over a fresh connection to HOST:PORT or unix:PATH."""
    sock = _connect(address, timeout_s)
    with sock:
        request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _connect(address: str, timeout_s: float) -> socket.socket:
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        sock.connect(address.removeprefix("unix:"))
        return sock
    host, _, port = address.rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), timeout_s)


def pinned(core: int, command: list[str]) -> list[str]:
    """`command`, run by taskset on one core."""
    return ["taskset", "-c", str(core), *command]


def _wait_for_line(
    server: ServerProcess, stream: IO[str], pattern: re.Pattern[str]
) -> re.Match[str]:
    # A server that exits closes the stream, which ends the loop early.
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        server.output.append(line)
        match = pattern.search(line)
        if match:
            return match
    server.stop()
    raise StartError("the server did not start:\n" + "".join(server.output))


def _wait_until_ready(server: ServerProcess, path: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            status, _ = http_get(server.lookup_address, path)
        except OSError:
            status = 0
        if status == 200:
            return
        # The sidecar logs its addresses only once ready, so this is rare.
        time.sleep(0.001)
    server.stop()
    raise StartError(f"{path} did not answer 200:\n" + "".join(server.output))


_COPIED_ROWS = re.compile(rb"^sidecar_lookup_copied_rows (\S+)$", re.MULTILINE)


def _wait_until_copied(server: ServerProcess, rows: int) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        _, metrics = http_get(server.lookup_address, "/metrics")
        match = _COPIED_ROWS.search(metrics)
        if match is not None and float(match.group(1)) >= rows:
            return
        time.sleep(0.05)
    server.stop()
    raise StartError(
        f"the sidecar did not copy {rows:,} rows:\n" + "".join(server.output)
    )


def _drain(server: ServerProcess, stream: IO[str]) -> None:
    # The sidecar logs a line per delivery; an unread pipe would stall it.
    def read() -> None:
        for line in stream:
            server.output.append(line)

    threading.Thread(target=read, name=f"output-{server.pid}", daemon=True).start()
