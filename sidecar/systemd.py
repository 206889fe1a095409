"""The systemd notify protocol: readiness, stopping, and watchdog pings.

Every function is a no-op when the process is not run by a unit with
`Type=notify`, i.e. when NOTIFY_SOCKET is unset.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger("sidecar.systemd")


def notify(message: str) -> bool:
    """Send one notification, such as READY=1; return whether one was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    # A leading @ names a socket in the abstract namespace.
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
        ) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd: %s", exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half systemd's timeout), or None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2


async def ping_watchdog(interval: float) -> None:
    """Ping from the event loop itself, so a stuck loop stops the pings."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
