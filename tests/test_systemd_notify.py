"""The systemd notify protocol, spoken by a real child process to a real socket."""

from __future__ import annotations

import socket
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Process


@pytest.fixture
def notify_socket() -> Iterator[socket.socket]:
    with tempfile.TemporaryDirectory(prefix="sd-") as directory:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(Path(directory) / "notify"))
        sock.settimeout(10)
        yield sock
        sock.close()


def _messages_until(sock: socket.socket, wanted: str) -> list[str]:
    messages = []
    while True:
        message = sock.recv(4096).decode()
        messages.append(message)
        if message == wanted:
            return messages


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        status: int = response.status
        return status


def test_notify_ready_is_sent_once_listeners_answer(
    sidecar_process: Callable[..., Process], notify_socket: socket.socket
) -> None:
    process = sidecar_process(env={"NOTIFY_SOCKET": notify_socket.getsockname()})

    assert _messages_until(notify_socket, "READY=1") == ["READY=1"]
    # Nothing may depend on a delay here: the moment READY=1 is read, both
    # listeners must already answer.
    assert _get(process.lookup_url + "/readyz") == 200
    request = urllib.request.Request(process.webhook_url + "/webhooks", method="GET")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 405
    assert process.terminate() == 0


def test_notify_watchdog_pings_at_half_the_interval(
    sidecar_process: Callable[..., Process], notify_socket: socket.socket
) -> None:
    process = sidecar_process(
        env={"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "400000"}
    )
    _messages_until(notify_socket, "READY=1")

    started = time.monotonic()
    pings = 0
    while pings < 5:
        assert notify_socket.recv(4096) == b"WATCHDOG=1"
        pings += 1
    elapsed = time.monotonic() - started

    # Five pings at 0.2 s take about 0.8 s after the first; a loose upper bound
    # only guards against pings at the full interval or slower.
    assert 0.5 < elapsed < 4
    assert process.terminate() == 0


def test_notify_watchdog_for_another_pid_is_not_ours(
    sidecar_process: Callable[..., Process], notify_socket: socket.socket
) -> None:
    process = sidecar_process(
        env={
            "NOTIFY_SOCKET": notify_socket.getsockname(),
            "WATCHDOG_USEC": "100000",
            "WATCHDOG_PID": "1",
        }
    )
    _messages_until(notify_socket, "READY=1")

    notify_socket.settimeout(0.5)
    with pytest.raises(TimeoutError):
        notify_socket.recv(4096)
    assert process.terminate() == 0


def test_notify_stopping_is_sent_on_sigterm(
    sidecar_process: Callable[..., Process], notify_socket: socket.socket
) -> None:
    process = sidecar_process(env={"NOTIFY_SOCKET": notify_socket.getsockname()})
    _messages_until(notify_socket, "READY=1")

    code = process.terminate()

    assert _messages_until(notify_socket, "STOPPING=1") == ["STOPPING=1"]
    assert code == 0


def test_notify_without_socket_runs_normally(
    sidecar_process: Callable[..., Process],
) -> None:
    process = sidecar_process()

    assert _get(process.lookup_url + "/readyz") == 200
    assert process.terminate() == 0
