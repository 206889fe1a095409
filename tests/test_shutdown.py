"""SIGTERM with deliveries in flight: finish or drop each one, never half-way.

A delivery in flight when systemd stops the sidecar is either answered 2xx and
stored, or not answered at all (Billing then retries it); the process exits 0
within its shutdown timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp
import pytest

from conftest import Process, signed_headers, subscription_event, wait_for

# Run these alone with `pytest -m reliability`.
pytestmark = pytest.mark.reliability

SHUTDOWN_TIMEOUT_S = 3.0
# Exiting takes the shutdown timeout at most, plus closing the database and
# the interpreter; this margin is for a loaded CI machine.
EXIT_MARGIN_S = 5.0
SENDERS = 10


def _start(sidecar_process: Callable[..., Process]) -> Process:
    return sidecar_process(
        env={
            "SIDECAR_SHUTDOWN_TIMEOUT_SECONDS": str(SHUTDOWN_TIMEOUT_S),
            # Longer than the test, so that only the shutdown ends a slow sender.
            "SIDECAR_READ_TIMEOUT_SECONDS": "60",
        }
    )


def _stored_ids(process: Process) -> set[str]:
    with contextlib.closing(sqlite3.connect(process.db)) as conn:
        return {row[0] for row in conn.execute("SELECT delivery_id FROM deliveries")}


async def _stop(process: Process) -> int:
    """Send SIGTERM; return the exit code, failing if it takes too long."""
    started = time.monotonic()
    process.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(
        process.proc.wait, SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S
    )
    assert time.monotonic() - started < SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S
    return code


async def _stopping(process: Process) -> None:
    """Wait until the child has logged that it is stopping."""
    lines: list[str] = process.proc.stderr_lines  # type: ignore[attr-defined]
    await wait_for(lambda: any("stopping" in line for line in lines), timeout=5)


def _request_parts(delivery_id: str) -> tuple[bytes, bytes]:
    body = json.dumps(subscription_event(f"shop-{delivery_id}", "active")).encode()
    headers = signed_headers(body, delivery_id=delivery_id)
    head = [
        "POST /webhooks HTTP/1.1",
        "Host: localhost",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode(), body


async def _send_until_refused(
    session: aiohttp.ClientSession,
    process: Process,
    sender: int,
    answers: dict[str, int],
    started: asyncio.Event,
) -> None:
    for number in range(10_000):
        delivery_id = f"msg-{sender}-{number}"
        body = json.dumps(subscription_event(f"shop-{sender}", "active")).encode()
        headers = signed_headers(body, delivery_id=delivery_id)
        try:
            async with session.post(
                process.webhook_url + "/webhooks", data=body, headers=headers
            ) as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError):
            return
        answers[delivery_id] = response.status
        if len(answers) >= 5 * SENDERS:
            started.set()


async def test_sigterm_with_deliveries_in_flight_stores_every_answered_one(
    sidecar_process: Callable[..., Process],
) -> None:
    process = _start(sidecar_process)
    answers: dict[str, int] = {}
    started = asyncio.Event()
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=20)
    ) as session:
        senders = [
            asyncio.create_task(
                _send_until_refused(session, process, sender, answers, started)
            )
            for sender in range(SENDERS)
        ]
        await asyncio.wait_for(started.wait(), 20)
        code = await _stop(process)
        await asyncio.gather(*senders)

    assert code == 0
    assert set(answers.values()) == {200}, answers
    assert set(answers) <= _stored_ids(process)


@pytest.mark.slow
async def test_sigterm_finishes_a_delivery_whose_body_is_still_arriving(
    sidecar_process: Callable[..., Process],
) -> None:
    process = _start(sidecar_process)
    head, body = _request_parts("msg-in-flight")
    address = urlsplit(process.webhook_url)
    assert address.hostname is not None and address.port is not None
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    writer.write(head + body[:10])
    await writer.drain()
    # Give the listener time to read the headers and start the handler.
    await asyncio.sleep(0.3)

    process.proc.send_signal(signal.SIGTERM)
    await _stopping(process)
    # The rest of the body arrives while the listener is shutting down.
    await asyncio.sleep(0.2)
    writer.write(body[10:])
    status_line = await asyncio.wait_for(reader.readline(), SHUTDOWN_TIMEOUT_S)
    writer.close()

    assert status_line.split()[1] == b"200"
    assert await asyncio.to_thread(process.proc.wait, EXIT_MARGIN_S) == 0
    assert _stored_ids(process) == {"msg-in-flight"}


@pytest.mark.slow
async def test_sigterm_with_a_stalled_sender_exits_zero_within_shutdown_timeout(
    sidecar_process: Callable[..., Process],
) -> None:
    process = _start(sidecar_process)
    head, body = _request_parts("msg-stalled")
    address = urlsplit(process.webhook_url)
    assert address.hostname is not None and address.port is not None
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    writer.write(head + body[:10])
    await writer.drain()
    await asyncio.sleep(0.3)

    code = await _stop(process)

    assert code == 0
    assert await reader.read() == b"", "a stalled delivery must not be answered"
    writer.close()
    assert _stored_ids(process) == set()
