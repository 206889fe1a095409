"""The webhook listener's HTTP/1.1 server: httptools parses, this module serves.

A burst of deliveries is bound by what each one costs the one core the sidecar
runs on. aiohttp's server builds a request object, a payload stream, a response
and its header map for every request, and under such a burst that came to
about a fifth of a delivery's CPU time. Here a request is read into a `Request`
of three fields and answered with one write; the parsing itself is llhttp's
(Node.js's parser), through httptools.

The server handles HTTP: keep-alive, answers in the order requests came, the
body limit (against Content-Length, and again as a body, chunked or not,
arrives), the read timeout, `Expect: 100-continue`, malformed or oversized
requests, and an orderly stop. What each request gets is the `Site`'s to say:
whether to read its body once its headers are in, then its answer.

A request refused before its body is read is answered in its turn, and the
connection is closed after it. The sender may still be sending that body, so
it is read and dropped first, for up to the read timeout: closing a socket
with unread data resets the connection, and the answer could be lost with it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol

import httptools
import pydantic_core
import yarl
from multidict import CIMultiDict

from . import log
from .settings import Listen

# What llhttp does not limit by itself: a request's line and headers together.
MAX_HEAD_BYTES = 32 * 1024
MAX_HEADERS = 100
# llhttp hands a header over only once it has ended, and until then httptools
# holds what has arrived of it: a header that never ends is refused once this
# much of an unfinished head has arrived, separators included.
MAX_HEAD_RECEIVED = 2 * MAX_HEAD_BYTES


@dataclass(slots=True)
class Request:
    """A delivery request whose body has fully arrived."""

    path: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def json_reply(
    payload: object, status: int = 200, headers: tuple[tuple[str, str], ...] = ()
) -> Reply:
    return Reply(status, pydantic_core.to_json(payload), headers)


def error_reply(
    status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()
) -> Reply:
    return json_reply({"status": status, "error": reason}, status, headers)


class Site(Protocol):
    """What the server asks of the listener it serves."""

    def admit(self, method: str, path: str, headers: CIMultiDict[str]) -> Reply | None:
        """Once the headers are in: None to read the body, else the answer."""

    async def handle(self, request: Request) -> Reply:
        """Answer a request admitted and fully read."""

    def too_large(self) -> Reply:
        """The answer to a body that turned out larger than the limit."""

    def done(self) -> None:
        """Called once for each admitted request, when it is over."""


class _HeadTooLarge(Exception):
    pass


class WebhookServer:
    """Accepts connections on one address and serves them until closed."""

    def __init__(self, site: Site, max_body_bytes: int, read_timeout_s: float) -> None:
        self.site = site
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._address = ""
        self._date_second = -1
        self._date = b""

    async def start(self, bind: Listen) -> None:
        loop = asyncio.get_running_loop()
        if bind.is_unix:
            self._server = await loop.create_unix_server(
                lambda: _Connection(self), bind.path
            )
            self._address = f"unix:{bind.path}"
            return
        self._server = await loop.create_server(
            lambda: _Connection(self), bind.host, bind.port
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        self._address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def address(self) -> str:
        return self._address

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self, grace_s: float) -> None:
        """Cancel what is still being handled, give it `grace_s`, close the rest.

        Answers already written still reach their senders: a transport closes
        once what it holds is sent.
        """
        self.stop_accepting()
        tasks = [c.task for c in self.connections if c.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        for connection in list(self.connections):
            connection.close()

    def date(self) -> bytes:
        """The Date header's value, made once a second."""
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = formatdate(now, usegmt=True).encode("ascii")
        return self._date


class _Connection(asyncio.Protocol):
    """One client connection: parse, admit, read, hand over, answer in order."""

    def __init__(self, server: WebhookServer) -> None:
        self.server = server
        self.site = server.site
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.task: asyncio.Task[None] | None = None
        # What waits for the answers before it: requests fully read, or answers
        # decided without reading; with whether to keep the connection open
        # after it, and whether the answer is to a HEAD (no body then).
        self.waiting: collections.deque[tuple[Request | Reply, bool, bool]] = (
            collections.deque()
        )
        # What to do if the read timeout passes first, and when it does. Setting
        # a deadline only records it: the one timer, firing early, sleeps again
        # until the deadline, so a request costs no timer of its own.
        self.on_deadline: Callable[[], None] | None = None
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.reading_paused = False
        # Once set, the connection closes after its last answer is sent, and
        # once the request being read has been read (or at the timeout).
        self.closing = False
        # The parser has failed: nothing more is read from this connection.
        self.broken = False
        # The request being parsed.
        self.in_message = False
        # Whether its line and headers have all arrived; until they have, the
        # bytes received since the last head ended (give or take the one chunk
        # that also held the end of the request before).
        self.head_done = False
        self.head_received = 0
        self.url = b""
        self.head_bytes = 0
        self.header_list: list[tuple[str, str]] = []
        self.path = ""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.body: list[bytes] = []
        self.body_bytes = 0
        # It was admitted and is not handed over yet.
        self.admitted = False
        # Its body is read only to be dropped.
        self.dropping = False

    # --- the connection -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self._wait_for_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._stop_timer()
        self.transport = None
        if self.admitted:
            self.admitted = False
            # Nobody is left to answer; the sender will retry the whole delivery.
            log.webhook.warning(
                "a sender closed its connection before its body arrived"
            )
            self.site.done()
        # Requests read but not handed over yet will never be answered.
        for item, _, _ in self.waiting:
            if isinstance(item, Request):
                self.site.done()
        self.waiting.clear()

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        if not self.head_done:
            self.head_received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            # What one of the callbacks below raised is the context.
            if isinstance(exc.__context__, _HeadTooLarge):
                self._fail(431, "the request line and headers are too large")
            else:
                log.webhook.error(
                    "unexpected error reading a request", exc_info=exc.__context__
                )
                self._fail(500, "internal error", logged=True)
        except httptools.HttpParserUpgrade:
            # Refused at its headers, above.
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError:
            self._fail(400, "malformed HTTP request")
        else:
            if not self.head_done and self.head_received > MAX_HEAD_RECEIVED:
                self._fail(431, "the request line and headers are too large")

    def close(self) -> None:
        self._close()

    # --- parser callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_message = True
        self.url = b""
        self.head_bytes = 0
        self.header_list = []
        self.body = []
        self.body_bytes = 0
        # Requests sent after one that closes the connection are not answered.
        self.dropping = self.closing

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        if len(self.header_list) >= MAX_HEADERS:
            raise _HeadTooLarge
        # As aiohttp reads them: bytes that are not UTF-8 become lone
        # surrogates, which nothing downstream mistakes for text it signed.
        self.header_list.append(
            (
                name.decode("utf-8", "surrogateescape"),
                value.decode("utf-8", "surrogateescape"),
            )
        )

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.head_received = 0
        self.on_deadline = None
        if self.dropping:
            return
        method = self.parser.get_method().decode("ascii", "replace")
        if self.parser.should_upgrade():
            # The parser reads no further than these headers: what follows
            # would be another protocol.
            log.webhook.warning("refused a request: it asks to switch protocols")
            reply = error_reply(400, "protocol upgrades are not supported")
            self._refuse(reply, head_only=method == "HEAD")
            return
        self.headers = CIMultiDict(self.header_list)
        self.path = _path_of(self.url)
        refusal = self.site.admit(method, self.path, self.headers)
        if refusal is None:
            length = self.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > self.server.max_body_bytes:
                self.site.done()
                refusal = self.site.too_large()
        if refusal is not None:
            self._refuse(refusal, head_only=method == "HEAD")
            return
        self.admitted = True
        self._expect_by(self._body_too_slow)
        # The interim answer is sent only when no answer to an earlier request
        # is still to come, since it would arrive before them; a sender that is
        # not told to go on sends its body after a wait of its own.
        expect = self.headers.get("Expect", "")
        if (
            expect.lower() == "100-continue"
            and self.task is None
            and not self.waiting
            and self.transport is not None
        ):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, chunk: bytes) -> None:
        if self.dropping:
            return
        self.body_bytes += len(chunk)
        if self.body_bytes > self.server.max_body_bytes:
            self._give_up(self.site.too_large(), wait_for_body=True)
            return
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.in_message = False
        self.head_done = False
        if self.dropping:
            self._close_when_done()
            return
        self.on_deadline = None
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body = []
        self.admitted = False
        keep_alive = self.parser.should_keep_alive()
        self._queue(Request(self.path, self.headers, body), keep_alive, False)

    # --- answering ----------------------------------------------------------

    def _queue(self, item: Request | Reply, keep_alive: bool, head_only: bool) -> None:
        self.waiting.append((item, keep_alive, head_only))
        if self.task is None and len(self.waiting) == 1:
            self._next()
        elif (
            not self.reading_paused
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            # A sender sending requests ahead of their answers waits until
            # those are answered, rather than piling them up here.
            self.transport.pause_reading()
            self.reading_paused = True

    def _next(self) -> None:
        """Answer what waits, in order, handing each request over in turn."""
        while self.waiting and self.task is None:
            item, keep_alive, head_only = self.waiting.popleft()
            if isinstance(item, Reply):
                self._send(item, keep_alive, head_only)
            else:
                self.task = self.loop.create_task(self._handle(item, keep_alive))
        if self.waiting or self.task is not None or self.transport is None:
            return
        if self.closing:
            self._close_when_done()
            return
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        if self.on_deadline is None and not self.admitted:
            self._wait_for_headers()

    async def _handle(self, request: Request, keep_alive: bool) -> None:
        try:
            reply = await self.site.handle(request)
        except Exception:
            log.webhook.exception("unexpected error handling a delivery")
            reply = error_reply(500, "internal error")
        finally:
            self.site.done()
        self.task = None
        self._send(reply, keep_alive, False)
        self._next()

    def _send(self, reply: Reply, keep_alive: bool, head_only: bool) -> None:
        if self.transport is None:
            return
        status = reply.status
        parts = [
            _status_line(status),
            b"Content-Type: application/json\r\nContent-Length: %d\r\nDate: %s\r\n"
            % (len(reply.body), self.server.date()),
        ]
        for name, value in reply.headers:
            parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
            self.closing = True
        parts.append(b"\r\n")
        if not head_only:
            parts.append(reply.body)
        self.transport.write(b"".join(parts))

    def _refuse(self, reply: Reply, head_only: bool) -> None:
        """Answer without reading the body; read and drop it, then close.

        Closing with unread data would reset the connection, and a sender
        still writing its body could lose the answer with it.
        """
        self.closing = True
        self.dropping = True
        self._queue(reply, False, head_only)
        if self.in_message:
            self._expect_by(self._close)

    def _give_up(self, reply: Reply, wait_for_body: bool) -> None:
        """Refuse an admitted request whose body is too large or too slow."""
        self.on_deadline = None
        self.body = []
        if self.admitted:
            self.admitted = False
            self.site.done()
        if wait_for_body:
            self._refuse(reply, head_only=False)
            return
        self.closing = True
        self.dropping = True
        self.in_message = False
        self._queue(reply, False, False)

    def _fail(self, status: int, reason: str, logged: bool = False) -> None:
        """The parser cannot go on: answer after what is queued, then close."""
        self.broken = True
        self.on_deadline = None
        if self.admitted:
            self.admitted = False
            self.site.done()
        self.closing = True
        self.in_message = False
        if self.dropping:
            # This request was answered already, without its body.
            self._close_when_done()
            return
        if not logged:
            log.webhook.warning("refused a request: %s", reason)
        self._queue(error_reply(status, reason), False, False)

    def _close_when_done(self) -> None:
        if (
            self.closing
            and not self.in_message
            and self.task is None
            and not self.waiting
        ):
            self._close()

    def _wait_for_headers(self) -> None:
        # Idle keep-alive connections, and headers that trickle in, are closed
        # after the read timeout without an answer.
        self._expect_by(self._close)

    def _body_too_slow(self) -> None:
        log.webhook.warning("refused a delivery whose body arrived too slowly")
        # Waiting for the rest would only hold the connection open longer.
        self._give_up(error_reply(408, "the body did not arrive in time"), False)

    def _expect_by(self, action: Callable[[], None]) -> None:
        """Call `action` unless something else is expected within the timeout."""
        self.on_deadline = action
        self.deadline = self.loop.time() + self.server.read_timeout_s
        if self.timer is None:
            self.timer = self.loop.call_at(self.deadline, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self.timer = None
        action = self.on_deadline
        if action is None:
            return
        if self.loop.time() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._deadline_passed)
            return
        self.on_deadline = None
        action()

    def _stop_timer(self) -> None:
        self.on_deadline = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _close(self) -> None:
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()

    def _count_head(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge


def _path_of(target: bytes) -> str:
    """The request path as aiohttp's router matches it: decoded, but %2F and %25."""
    text = target.decode("utf-8", "surrogateescape")
    if text == "/webhooks":
        return text
    try:
        if text.startswith("/"):
            path, _, _ = text.partition("?")
            path = path.partition("#")[0]
            if "%" not in path:
                return path
            return yarl.URL.build(path=path, encoded=True).path_safe
        # An absolute-form target, as a proxy would send it.
        return yarl.URL(text).path_safe
    except (ValueError, TypeError):
        return ""


@functools.cache
def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("ascii")
