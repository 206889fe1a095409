"""Slow and abusive clients must not hold up anyone else.

A client that trickles its headers or its body, or opens connections and sends
nothing, must not delay a normal delivery or lookup. The read timeout
(SIDECAR_READ_TIMEOUT_SECONDS) disconnects such clients, and the cap on webhook
requests in progress (SIDECAR_MAX_WEBHOOK_CONNECTIONS) refuses the excess with
503 rather than letting it pile up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from conftest import (
    Running,
    StartSidecar,
    signed_headers,
    subscription_event,
    wait_for,
)

# Run these alone with `pytest -m reliability`.
pytestmark = pytest.mark.reliability

# Far more than a normal answer takes, and far less than a client waiting on a
# slow one would: "answers while a slow client is pending", not a benchmark.
PROMPTLY_S = 5.0
SLOW_CLIENTS = 20

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _connect(url: str) -> Connection:
    address = urlsplit(url)
    assert address.hostname is not None and address.port is not None
    return await asyncio.open_connection(address.hostname, address.port)


def _signed_request(delivery_id: str, shop_id: str = "slow-shop") -> bytes:
    body = json.dumps(subscription_event(shop_id, "active")).encode()
    headers = signed_headers(body, delivery_id=delivery_id)
    head = [
        "POST /webhooks HTTP/1.1",
        "Host: localhost",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _trickle(
    writer: asyncio.StreamWriter, data: bytes, interval_s: float
) -> None:
    """Send `data` a byte at a time, until done or cancelled."""
    for index in range(len(data)):
        writer.write(data[index : index + 1])
        await writer.drain()
        await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def _pending(
    url: str, data: bytes, count: int, interval_s: float = 0.2
) -> AsyncIterator[list[Connection]]:
    """Keep `count` connections busy trickling `data`; close them on exit."""
    connections = [await _connect(url) for _ in range(count)]
    tasks = [
        asyncio.create_task(_trickle(writer, data, interval_s))
        for _, writer in connections
    ]
    try:
        yield connections
    finally:
        for task in tasks:
            task.cancel()
        for _, writer in connections:
            writer.close()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _normal_clients_answer(sidecar: Running, delivery_id: str) -> None:
    status, answer = await asyncio.wait_for(
        sidecar.post(
            subscription_event("normal-shop", "active"), delivery_id=delivery_id
        ),
        PROMPTLY_S,
    )
    assert (status, answer["result"]) == (200, "applied")
    status, answer = await asyncio.wait_for(
        sidecar.get("/entitlement/normal-shop?product=mymodule"), PROMPTLY_S
    )
    assert (status, answer["status"]) == (200, "active")


async def _answer_or_close(connection: Connection, within_s: float) -> bytes:
    """The first line the server sends, or b"" if it closes without answering."""
    reader, _ = connection
    return await asyncio.wait_for(reader.readline(), within_s)


async def test_slow_headers_do_not_delay_other_clients(sidecar: Running) -> None:
    request = _signed_request("msg-slow-headers")

    async with (
        _pending(sidecar.webhook_url, request, SLOW_CLIENTS),
        _pending(sidecar.lookup_url, b"GET /healthz HTTP/1.1\r\n", SLOW_CLIENTS),
    ):
        await asyncio.sleep(0.3)
        await _normal_clients_answer(sidecar, "msg-normal")


async def test_slow_body_does_not_delay_other_clients(sidecar: Running) -> None:
    request = _signed_request("msg-slow-body")
    head, _, body = request.partition(b"\r\n\r\n")
    connections = [await _connect(sidecar.webhook_url) for _ in range(SLOW_CLIENTS)]
    for _, writer in connections:
        writer.write(head + b"\r\n\r\n" + body[:10])

    try:
        await asyncio.sleep(0.3)
        await _normal_clients_answer(sidecar, "msg-normal")
    finally:
        for _, writer in connections:
            writer.close()
    assert sidecar.query("SELECT delivery_id FROM deliveries") == [("msg-normal",)]


async def test_idle_connections_do_not_delay_other_clients(sidecar: Running) -> None:
    idle = [await _connect(sidecar.webhook_url) for _ in range(200)]
    idle += [await _connect(sidecar.lookup_url) for _ in range(200)]
    try:
        await _normal_clients_answer(sidecar, "msg-normal")
    finally:
        for _, writer in idle:
            writer.close()


@pytest.fixture
async def impatient_sidecar(start_sidecar: StartSidecar) -> Running:
    return await start_sidecar(env={"SIDECAR_READ_TIMEOUT_SECONDS": "1"})


async def test_read_timeout_closes_connection_with_stalled_headers(
    impatient_sidecar: Running,
) -> None:
    connection = await _connect(impatient_sidecar.webhook_url)
    connection[1].write(b"POST /webhooks HTTP/1.1\r\nHost: local")

    first_line = await _answer_or_close(connection, PROMPTLY_S)

    assert first_line == b"" or first_line.split()[1] == b"408"
    connection[1].close()


async def test_read_timeout_answers_408_to_stalled_body(
    impatient_sidecar: Running,
) -> None:
    head, _, body = _signed_request("msg-stalled").partition(b"\r\n\r\n")
    connection = await _connect(impatient_sidecar.webhook_url)
    connection[1].write(head + b"\r\n\r\n" + body[:10])

    first_line = await _answer_or_close(connection, PROMPTLY_S)

    assert first_line.split()[1] == b"408"
    connection[1].close()
    assert impatient_sidecar.query("SELECT count(*) FROM deliveries") == [(0,)]
    assert impatient_sidecar.query("SELECT count(*) FROM quarantine") == [(0,)]


async def test_read_timeout_leaves_a_slow_but_moving_lookup_client_alone(
    impatient_sidecar: Running,
) -> None:
    # Lookups come from local module code; they are never slow on purpose, and
    # the read timeout must not cut a request that is merely arriving.
    connection = await _connect(impatient_sidecar.lookup_url)
    await _trickle(connection[1], b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 0.02)

    first_line = await _answer_or_close(connection, PROMPTLY_S)

    assert first_line.split()[1] == b"200"
    connection[1].close()


async def test_webhook_cap_answers_503_past_the_limit_and_frees_up(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar(env={"SIDECAR_MAX_WEBHOOK_CONNECTIONS": "2"})
    head, _, body = _signed_request("msg-holding").partition(b"\r\n\r\n")
    holders = [await _connect(sidecar.webhook_url) for _ in range(2)]
    for _, writer in holders:
        writer.write(head + b"\r\n\r\n" + body[:10])
    await asyncio.sleep(0.3)

    over_the_cap = json.dumps(subscription_event("capped-shop", "active")).encode()
    async with sidecar.session.post(
        sidecar.webhook_url + "/webhooks",
        data=over_the_cap,
        headers=signed_headers(over_the_cap, delivery_id="msg-over-the-cap"),
    ) as response:
        assert response.status == 503
        assert response.headers["Retry-After"].isdigit()
    status, _ = await asyncio.wait_for(sidecar.get("/healthz"), PROMPTLY_S)
    assert status == 200

    for _, writer in holders:
        writer.close()
    await asyncio.sleep(0.3)
    await _normal_clients_answer(sidecar, "msg-after-the-cap")


async def test_sender_disconnecting_mid_body_is_a_warning_not_an_error(
    sidecar: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    head, _, body = _signed_request("msg-gone").partition(b"\r\n\r\n")
    connection = await _connect(sidecar.webhook_url)
    connection[1].write(head + b"\r\n\r\n" + body[:10])
    await asyncio.sleep(0.3)

    connection[1].close()
    await wait_for(lambda: bool(caplog.records), timeout=3)

    # Refused client input is a warning; errors are for what an operator fixes.
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    await _normal_clients_answer(sidecar, "msg-normal")


async def test_flood_of_unknown_shop_lookups_leaves_no_trace(
    sidecar: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await sidecar.post(subscription_event("known-shop", "active"))
    async with sidecar.session.get(sidecar.lookup_url + "/metrics") as response:
        metrics_before = await response.text()
    tables_before = sidecar.query("SELECT * FROM deliveries")
    caplog.clear()

    answers = await asyncio.gather(
        *(sidecar.get(f"/entitlement/stranger-{number}") for number in range(500))
    )

    assert {status for status, _ in answers} == {404}
    # A miss writes nothing, logs nothing, and adds no metric series: the only
    # lines that change are counter and histogram values.
    assert sidecar.query("SELECT * FROM deliveries") == tables_before
    assert sidecar.query("SELECT count(*) FROM quarantine") == [(0,)]
    assert caplog.records == []
    async with sidecar.session.get(sidecar.lookup_url + "/metrics") as response:
        metrics_after = await response.text()

    def series(text: str) -> list[str]:
        return [line.rsplit(" ", 1)[0] for line in text.splitlines()]

    new_series = set(series(metrics_after)) - set(series(metrics_before))
    assert new_series <= {'sidecar_lookups_total{result="unknown_shop"}'}
    assert "stranger" not in metrics_after
