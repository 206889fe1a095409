"""The webhook listener's HTTP/1.1, spoken byte for byte over a real socket.

Senders are HTTP clients of every kind, and some are hostile: requests sent
ahead of their answers, bodies announced with `Expect: 100-continue` or sent in
chunks, oversized or malformed heads, requests that close the connection or
ask to switch protocols. Each gets a well-formed answer in its turn, and
nothing refused reaches the database.
"""

from __future__ import annotations

import asyncio
import json
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

PROMPTLY_S = 5.0


class Answer:
    """One HTTP answer as read off the wire."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> dict[str, object]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


class Client:
    """A raw connection to the webhook listener."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, sidecar: Running) -> Client:
        address = urlsplit(sidecar.webhook_url)
        assert address.hostname is not None and address.port is not None
        reader, writer = await asyncio.open_connection(address.hostname, address.port)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def answer(self, head_only: bool = False) -> Answer:
        """Read one answer; `head_only` for the answer to a HEAD request."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), PROMPTLY_S)
        status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        version, status, _ = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head_only else int(headers["content-length"])
        body = await asyncio.wait_for(self.reader.readexactly(length), PROMPTLY_S)
        return Answer(int(status), headers, body)

    async def closed(self) -> bool:
        """Whether the server closes the connection without sending more."""
        rest = await asyncio.wait_for(self.reader.read(), PROMPTLY_S)
        return rest == b""

    def close(self) -> None:
        self.writer.close()


def delivery(
    delivery_id: str,
    shop_id: str = "http-shop",
    extra_head: str = "",
    version: str = "HTTP/1.1",
) -> bytes:
    body = json.dumps(subscription_event(shop_id, "active")).encode()
    headers = signed_headers(body, delivery_id=delivery_id)
    head = [
        f"POST /webhooks {version}",
        "Host: localhost",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n" + extra_head + "\r\n").encode() + body


def stored(sidecar: Running) -> list[str]:
    rows = sidecar.query("SELECT delivery_id FROM deliveries ORDER BY delivery_id")
    return [delivery_id for (delivery_id,) in rows]


@pytest.fixture
async def client(sidecar: Running) -> AsyncIterator[Client]:
    connection = await Client.connect(sidecar)
    yield connection
    connection.close()


async def test_requests_on_one_connection_are_answered_in_order(
    sidecar: Running, client: Client
) -> None:
    # Sent ahead of their answers, in one write: each is still answered, in
    # the order sent.
    client.send(b"".join(delivery(f"msg-{n}", f"shop-{n}") for n in range(5)))

    answers = [await client.answer() for _ in range(5)]

    assert [a.json()["delivery_id"] for a in answers] == [f"msg-{n}" for n in range(5)]
    assert {a.status for a in answers} == {200}
    assert stored(sidecar) == [f"msg-{n}" for n in range(5)]

    # And the connection stays open for more.
    client.send(delivery("msg-later", "shop-later"))
    assert (await client.answer()).json()["result"] == "applied"


async def test_expect_100_continue_is_told_to_go_on(
    sidecar: Running, client: Client
) -> None:
    request = delivery("msg-expect", extra_head="Expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    client.send(head + b"\r\n\r\n")

    interim = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), PROMPTLY_S)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.send(body)
    answer = await client.answer()

    assert (answer.status, answer.json()["result"]) == (200, "applied")
    assert stored(sidecar) == ["msg-expect"]


async def test_chunked_body_is_read_whole(sidecar: Running, client: Client) -> None:
    body = json.dumps(subscription_event("chunked-shop", "active")).encode()
    headers = signed_headers(body, delivery_id="msg-chunked")
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 100]), body[i : i + 100])
        for i in range(0, len(body), 100)
    )
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    client.send(
        b"POST /webhooks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        + head.encode()
        + b"\r\n"
        + chunks
        + b"0\r\n\r\n"
    )

    answer = await client.answer()

    assert (answer.status, answer.json()["result"]) == (200, "applied")
    assert sidecar.query("SELECT body FROM deliveries") == [(body,)]


async def test_answers_carry_a_date_and_no_server_banner(client: Client) -> None:
    client.send(delivery("msg-headers"))

    answer = await client.answer()

    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["date"].endswith(" GMT")
    # Which server and version answers is nobody's business.
    assert "server" not in answer.headers


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NONSENSE\r\n\r\n", 400),
        (b"POST /webhooks HTTP/9.9\r\nHost: x\r\n\r\n", 400),
        (b"POST /webhooks HTTP/1.1\r\nHost x\r\n\r\n", 400),
        (b"POST /webhooks HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400),
        # Two lengths that disagree, or a length beside chunks: the ways one
        # request is smuggled inside another.
        (
            b"POST /webhooks HTTP/1.1\r\nContent-Length: 1\r\n"
            b"Content-Length: 2\r\n\r\nab",
            400,
        ),
        (
            b"POST /webhooks HTTP/1.1\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"POST /webhooks HTTP/1.1\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n", 431),
        (
            b"POST /webhooks HTTP/1.1\r\n"
            + b"".join(b"X-%d: 1\r\n" % n for n in range(150))
            + b"\r\n",
            431,
        ),
        (b"POST /webhooks?" + b"q" * 40_000 + b" HTTP/1.1\r\n\r\n", 431),
        # A header that never ends is refused as it grows, not at its end.
        (b"POST /webhooks HTTP/1.1\r\nX-Big: " + b"a" * 100_000, 431),
        (b"POST /webhooks HTTP/1.1\r\n" + b"X" * 100_000, 431),
        (
            b"POST /webhooks HTTP/1.1\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nContent-Length: 0\r\n\r\n",
            400,
        ),
        (
            b"GET /webhooks HTTP/1.1\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n",
            400,
        ),
    ],
)
async def test_malformed_request_is_answered_then_closed(
    sidecar: Running, client: Client, request_bytes: bytes, status: int
) -> None:
    client.send(request_bytes)

    answer = await client.answer()

    assert answer.status == status
    assert answer.json()["status"] == status
    assert answer.headers["connection"] == "close"
    assert await client.closed()
    assert stored(sidecar) == []
    assert sidecar.query("SELECT count(*) FROM quarantine") == [(0,)]


async def test_malformed_request_after_a_good_one_waits_its_turn(
    sidecar: Running, client: Client
) -> None:
    client.send(delivery("msg-before-garbage") + b"GARBAGE\r\n\r\n")

    first = await client.answer()
    second = await client.answer()

    assert (first.status, first.json()["delivery_id"]) == (200, "msg-before-garbage")
    assert second.status == 400
    assert await client.closed()
    assert stored(sidecar) == ["msg-before-garbage"]


async def test_head_request_is_405_without_a_body(client: Client) -> None:
    client.send(b"HEAD /webhooks HTTP/1.1\r\nHost: x\r\n\r\n")

    answer = await client.answer(head_only=True)

    assert answer.status == 405
    assert answer.headers["allow"] == "POST"
    assert int(answer.headers["content-length"]) > 0
    # Nothing follows the head: the connection closes after it.
    assert await client.closed()


async def test_request_refused_before_its_body_is_answered_then_closed(
    sidecar: Running, client: Client
) -> None:
    request = delivery("msg-wrong-route").replace(b"POST /webhooks", b"POST /nowhere")
    head, _, body = request.partition(b"\r\n\r\n")
    client.send(head + b"\r\n\r\n")

    # The answer comes before the body is sent, and the body that follows is
    # read and dropped rather than taken for a request of its own.
    answer = await client.answer()
    client.send(body + delivery("msg-after-refusal"))

    assert answer.status == 404
    assert answer.headers["connection"] == "close"
    assert await client.closed()
    assert stored(sidecar) == []


async def test_connection_close_is_honoured(sidecar: Running, client: Client) -> None:
    client.send(delivery("msg-close", extra_head="Connection: close\r\n"))

    answer = await client.answer()

    assert (answer.status, answer.headers["connection"]) == (200, "close")
    assert await client.closed()
    assert stored(sidecar) == ["msg-close"]


async def test_http_1_0_sender_gets_its_answer_and_a_closed_connection(
    sidecar: Running, client: Client
) -> None:
    client.send(delivery("msg-http10", version="HTTP/1.0"))

    answer = await client.answer()

    assert (answer.status, answer.json()["result"]) == (200, "applied")
    assert await client.closed()


async def test_sender_gone_before_its_answer_still_has_its_delivery_stored(
    sidecar: Running,
) -> None:
    # Complete requests are recorded even if nobody waits for the answer: the
    # sender will retry, and the retry is then a duplicate.
    client = await Client.connect(sidecar)
    client.send(delivery("msg-gone-early"))
    await client.writer.drain()
    client.close()

    await wait_for(lambda: bool(stored(sidecar)), timeout=PROMPTLY_S)
    assert stored(sidecar) == ["msg-gone-early"]


async def test_refused_and_abandoned_requests_give_back_their_place(
    start_sidecar: StartSidecar,
) -> None:
    # With room for one delivery at a time, every way a request can end
    # without an answer of 200 must leave that room free again.
    sidecar = await start_sidecar(
        env={"SIDECAR_MAX_WEBHOOK_CONNECTIONS": "1", "SIDECAR_MAX_BODY_BYTES": "4096"}
    )
    endings = [
        # Announced larger than the limit.
        (delivery("msg-long").replace(b"Content-Length: ", b"Content-Length: 9"), 413),
        # Sent in chunks that outgrow the limit.
        (
            b"POST /webhooks HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"1000\r\n"
            + b"x" * 4096
            + b"\r\n1\r\nx\r\n",
            413,
        ),
        # Refused by the signature check.
        (
            delivery("msg-unsigned").replace(b"webhook-signature: v1,", b"x-no: "),
            401,
        ),
        # Malformed after its headers were admitted.
        (
            b"POST /webhooks HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            400,
        ),
    ]
    for request, status in endings:
        client = await Client.connect(sidecar)
        client.send(request)
        assert (await client.answer()).status == status
        client.close()
    # And a sender that goes away in the middle of its body.
    client = await Client.connect(sidecar)
    client.send(delivery("msg-half")[:-10])
    await client.writer.drain()
    await asyncio.sleep(0.2)
    client.close()

    async def answered() -> int:
        client = await Client.connect(sidecar)
        client.send(delivery("msg-after-all-that"))
        status = (await client.answer()).status
        client.close()
        return status

    for _ in range(20):
        if await answered() == 200:
            break
        await asyncio.sleep(0.1)
    assert stored(sidecar) == ["msg-after-all-that"]


async def test_idle_connection_is_closed_after_the_read_timeout(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar(env={"SIDECAR_READ_TIMEOUT_SECONDS": "1"})
    client = await Client.connect(sidecar)

    # Each answer gives the connection the whole read timeout again: it is
    # still open well past one timeout from the start.
    for number in range(3):
        client.send(delivery(f"msg-idle-{number}", f"idle-shop-{number}"))
        assert (await client.answer()).status == 200
        await asyncio.sleep(0.6)

    assert await client.closed()
    client.close()
