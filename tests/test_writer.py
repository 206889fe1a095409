"""The database writer: group commit, failures that stay with their batch, and close."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from sidecar.storage import StorageUnavailable, Writer


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[Writer]:
    writer = Writer(str(tmp_path / "sidecar.db"), 5000)
    await writer.start()
    yield writer
    await writer.close()


def _insert(value: str) -> Callable[[sqlite3.Connection], str]:
    def job(conn: sqlite3.Connection) -> str:
        conn.execute(
            "INSERT INTO settings_in_use (name, value) VALUES (?, ?)", (value, value)
        )
        return value

    return job


def _stored(tmp_path: Path) -> list[str]:
    with sqlite3.connect(tmp_path / "sidecar.db") as conn:
        rows = conn.execute("SELECT name FROM settings_in_use ORDER BY name")
        return [name for (name,) in rows]


async def test_concurrent_writes_share_commits_and_each_gets_its_result(
    writer: Writer, tmp_path: Path
) -> None:
    commits_before = writer.commits

    results = await asyncio.gather(
        *(writer.submit(_insert(f"job-{n:03}")) for n in range(200))
    )

    assert results == [f"job-{n:03}" for n in range(200)]
    assert _stored(tmp_path) == [f"job-{n:03}" for n in range(200)]
    # Queued together, they cannot each have needed a commit of their own.
    assert writer.commits - commits_before < 200


@pytest.mark.parametrize("error", [ValueError("a bug in a job"), SystemExit(1)])
async def test_a_failing_job_fails_its_batch_and_the_writer_goes_on(
    writer: Writer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    error: BaseException,
) -> None:
    def broken(conn: sqlite3.Connection) -> None:
        raise error

    with pytest.raises(StorageUnavailable):
        await asyncio.wait_for(writer.submit(broken), 5)

    # Not a database error: logged with its traceback for whoever fixes it.
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "unexpected error in the database writer"
    ]
    assert errors[0].exc_info is not None
    # The batch was rolled back and the writer still commits what comes next.
    assert await asyncio.wait_for(writer.submit(_insert("after")), 5) == "after"
    assert _stored(tmp_path) == ["after"]


async def test_close_commits_what_is_queued_then_refuses_more(
    writer: Writer, tmp_path: Path
) -> None:
    pending = [
        asyncio.ensure_future(writer.submit(_insert(f"late-{n}"))) for n in range(20)
    ]
    await asyncio.sleep(0)

    await asyncio.wait_for(writer.close(), 5)

    assert [await job for job in pending] == [f"late-{n}" for n in range(20)]
    assert _stored(tmp_path) == sorted(f"late-{n}" for n in range(20))
    with pytest.raises(StorageUnavailable):
        await writer.submit(_insert("too-late"))
