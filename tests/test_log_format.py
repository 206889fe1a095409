"""The plain log format writes exactly what the standard library's formatter does.

It only formats the date and time once a second instead of once a line.
"""

from __future__ import annotations

import logging

import pytest

from sidecar.log import PlainFormatter


def _record(created: float) -> logging.LogRecord:
    return logging.makeLogRecord(
        {
            "name": "sidecar.webhook",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "delivery %s result=%s",
            "args": ("d1", "applied"),
            "created": created,
            "msecs": (created - int(created)) * 1000,
        }
    )


@pytest.mark.parametrize(
    "created",
    [1_700_000_000.0, 1_700_000_000.9995, 1_700_000_001.0004, 1_700_000_059.5],
)
def test_plain_line_is_what_the_standard_formatter_writes(created: float) -> None:
    ours = PlainFormatter()
    standard = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    # One formatter throughout, so that later lines use its per-second cache,
    # and a line in an earlier second after a later one.
    for when in (created - 1, created, created + 0.25, created - 1, created):
        assert ours.format(_record(when)) == standard.format(_record(when))
