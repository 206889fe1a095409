"""Log lines of one pass of the event loop reach the stream in one write, in order."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import weakref
from collections.abc import Iterator

import pytest

from sidecar.log import LoopBatchedHandler


class RecordingStream(io.StringIO):
    """A text stream that remembers what each write() call carried."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, RecordingStream]]:
    stream = RecordingStream()
    handler = LoopBatchedHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("sidecar.test-batching")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.handlers[:] = []


async def test_lines_of_one_pass_are_written_together_after_it(
    logger: tuple[logging.Logger, RecordingStream],
) -> None:
    log, stream = logger
    for number in range(5):
        log.info("delivery %d", number)

    # Nothing is written while the pass that logged the lines goes on.
    assert stream.writes == []
    await asyncio.sleep(0)

    assert stream.writes == ["".join(f"delivery {n}\n" for n in range(5))]


async def test_passes_are_written_separately_and_in_order(
    logger: tuple[logging.Logger, RecordingStream],
) -> None:
    log, stream = logger
    log.info("first")
    await asyncio.sleep(0)
    log.info("second")
    log.info("third")
    await asyncio.sleep(0)

    assert stream.writes == ["first\n", "second\nthird\n"]


async def test_a_line_from_another_thread_follows_the_waiting_ones(
    logger: tuple[logging.Logger, RecordingStream],
) -> None:
    log, stream = logger
    log.info("from the loop")
    thread = threading.Thread(target=log.warning, args=("from a thread",))
    thread.start()
    thread.join()

    # Where no loop runs, a line is written at once, after those waiting.
    assert stream.getvalue() == "from the loop\nfrom a thread\n"
    await asyncio.sleep(0)
    assert stream.getvalue() == "from the loop\nfrom a thread\n"


def test_without_a_running_loop_each_line_is_written_at_once(
    logger: tuple[logging.Logger, RecordingStream],
) -> None:
    log, stream = logger
    log.info("starting")
    assert stream.writes == ["starting\n"]
    log.info("started")
    assert stream.writes == ["starting\n", "started\n"]


async def test_waiting_lines_are_written_when_logging_shuts_down(
    logger: tuple[logging.Logger, RecordingStream],
) -> None:
    log, stream = logger
    log.info("last words")
    # What runs at exit, here before the loop has had its next pass.
    logging.shutdown([weakref.ref(handler) for handler in log.handlers])

    assert stream.getvalue() == "last words\n"
