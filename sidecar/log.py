"""Named loggers and the two log formats.

Under systemd (JOURNAL_STREAM is set) lines carry no timestamp of their own,
since journald adds one, and start with a `<N>` syslog priority so journald
records the right level. JSON lines suit log shippers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import TextIO

webhook = logging.getLogger("sidecar.webhook")
lookup = logging.getLogger("sidecar.lookup")
server = logging.getLogger("sidecar.server")

# Whether a record's `fields` (its facts by name) are written: only the JSON
# format shows them, and a line logged for every delivery pays for building
# them whether they are shown or not.
fields_shown = True

_SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{record.name}: {super().format(record)}"


class PlainFormatter(logging.Formatter):
    """Lines for a terminal or a file, each starting with the local time.

    The date and time are formatted once a second rather than for every line:
    at a burst of deliveries, strftime was a fifth of the cost of a line.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            # Records are formatted under their handler's lock, one at a time.
            self._stamp = time.strftime(
                self.default_time_format, time.localtime(second)
            )
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    def __init__(self, with_time: bool) -> None:
        super().__init__()
        self._with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._with_time:
            line["time"] = self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z")
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"))


class LoopBatchedHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes the lines of one pass of the event loop at once.

    When a commit releases many deliveries together, each logs its line in the
    same pass of the loop. Written together, they cost one system call and one
    wake-up of whatever reads the stream (journald), rather than one per line.
    A record logged where no loop runs (start-up, the database writer's thread)
    is written at once, after any lines still waiting, so the order holds. A
    process killed outright loses at most the lines of the pass it was in; an
    orderly exit writes them, since logging flushes every handler then.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._waiting: list[str] = []
        # The first waiting record, for handleError to name if the write fails.
        self._first: logging.LogRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # logging calls this holding the handler's lock, which flush takes too.
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if not self._waiting:
            self._first = record
        self._waiting.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if len(self._waiting) == 1:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if not self._waiting:
                return
            lines, self._waiting = self._waiting, []
            first, self._first = self._first, None
            try:
                self.stream.write(self.terminator.join(lines) + self.terminator)
                self.stream.flush()
            except Exception:
                assert first is not None
                self.handleError(first)


def configure(log_format: str, level: str) -> None:
    """Send the sidecar's logs to stderr in the chosen format."""
    global fields_shown
    fields_shown = log_format == "json"
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    handler = LoopBatchedHandler(sys.stderr)
    formatter: logging.Formatter
    if log_format == "json":
        formatter = JsonFormatter(with_time=not under_journal)
    elif under_journal:
        formatter = JournalFormatter("%(message)s")
    else:
        formatter = PlainFormatter()
    handler.setFormatter(formatter)
    # No format here shows the thread, the process or the calling line, and
    # looking them up costs every record a few microseconds.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger("sidecar")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # aiohttp's access log would print every lookup; the sidecar logs its own
    # one line per delivery instead.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
