"""Storage faults: a full disk, a read-only database, a lock held past its timeout.

Each fault must be answered 503 with Retry-After, so that Billing retries the
delivery later; never 2xx for a delivery that was not stored, and never 500.
Meanwhile the process stays up, lookups answer from what is stored, and a retry
is accepted once the fault clears.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from conftest import Process, Running, StartSidecar, signed_headers, subscription_event

# Run these alone with `pytest -m reliability`.
pytestmark = pytest.mark.reliability

PRODUCT = "mymodule"
STORED_SHOP = "shop-stored-before-the-fault"


class Answer:
    """A webhook answer with the headers a 503 must carry."""

    def __init__(
        self, status: int, payload: dict[str, Any], headers: CIMultiDictProxy[str]
    ) -> None:
        self.status = status
        self.payload = payload
        self.headers = headers

    def assert_retry_later(self) -> None:
        assert self.status == 503, f"expected 503, got {self.status} {self.payload}"
        retry_after = self.headers.get("Retry-After", "")
        assert retry_after.isdigit(), f"Retry-After must be seconds: {retry_after!r}"


async def _deliver(
    session: aiohttp.ClientSession, webhook_url: str, body: bytes, delivery_id: str
) -> Answer:
    headers = signed_headers(body, delivery_id=delivery_id)
    async with session.post(webhook_url + "/webhooks", data=body, headers=headers) as r:
        payload = json.loads(await r.read() or b"{}")
        return Answer(r.status, payload, r.headers)


def _event(shop_id: str, version: int, padding_bytes: int = 0) -> bytes:
    body = subscription_event(
        shop_id,
        "active",
        product=PRODUCT,
        resource_version=version,
        # An unknown field: kept in the stored body, so the delivery takes room.
        notes="x" * padding_bytes,
    )
    return json.dumps(body).encode()


async def _lookup_status(session: aiohttp.ClientSession, lookup_url: str) -> str:
    async with session.get(
        f"{lookup_url}/entitlement/{STORED_SHOP}?product={PRODUCT}"
    ) as response:
        assert response.status == 200, await response.text()
        payload = await response.json()
    return str(payload["status"])


def _stored_ids(db: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {row[0] for row in conn.execute("SELECT delivery_id FROM deliveries")}


async def _store_one_then_fail(
    session: aiohttp.ClientSession, running: Running | Process, shop_prefix: str
) -> tuple[list[str], list[tuple[str, bytes]]]:
    """Send growing deliveries until the fault refuses one; return both kinds."""
    stored: list[str] = []
    refused: list[tuple[str, bytes]] = []
    for version in range(2, 60):
        delivery_id = f"{shop_prefix}-{version}"
        body = _event(f"{shop_prefix}-{version}", version, padding_bytes=64 * 1024)
        answer = await _deliver(session, running.webhook_url, body, delivery_id)
        if answer.status == 200:
            stored.append(delivery_id)
            continue
        answer.assert_retry_later()
        refused.append((delivery_id, body))
        break
    assert refused, "the fault never refused a delivery"
    return stored, refused


# --- disk full ---------------------------------------------------------------


async def test_disk_full_by_file_size_limit_answers_503_then_recovers(
    sidecar_process: Any,
) -> None:
    process: Process = sidecar_process()
    wal = Path(f"{process.db}-wal")
    async with aiohttp.ClientSession() as session:
        first = await _deliver(
            session, process.webhook_url, _event(STORED_SHOP, 1), "stored-1"
        )
        assert first.status == 200

        # RLIMIT_FSIZE makes any write past the limit fail with EFBIG, as a full
        # disk would; CPython ignores SIGXFSZ, so the child is not killed.
        _, hard = resource.prlimit(process.proc.pid, resource.RLIMIT_FSIZE)
        limit = max(process.db.stat().st_size, wal.stat().st_size) + 256 * 1024
        resource.prlimit(process.proc.pid, resource.RLIMIT_FSIZE, (limit, hard))
        try:
            stored, refused = await _store_one_then_fail(session, process, "full")
            assert await _lookup_status(session, process.lookup_url) == "active"
            assert process.proc.poll() is None
        finally:
            resource.prlimit(process.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))

        retry_id, retry_body = refused[0]
        retry = await _deliver(session, process.webhook_url, retry_body, retry_id)
        assert (retry.status, retry.payload["result"]) == (200, "applied")

    assert _stored_ids(process.db) == {"stored-1", *stored, retry_id}


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, where a full disk is a real ENOSPC."""
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    # Unbuffered: a buffered file would try the write that failed again when
    # it is closed, and fail again.
    with filler.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


async def test_disk_full_on_tmpfs_answers_503_then_recovers(
    small_tmpfs: Path, start_sidecar: StartSidecar
) -> None:
    running = await start_sidecar(db=small_tmpfs / "sidecar.db")
    first = await _deliver(
        running.session, running.webhook_url, _event(STORED_SHOP, 1), "stored-1"
    )
    assert first.status == 200

    filler = _fill(small_tmpfs)
    stored, refused = await _store_one_then_fail(running.session, running, "full")
    assert await _lookup_status(running.session, running.lookup_url) == "active"

    filler.unlink()
    retry_id, retry_body = refused[0]
    retry = await _deliver(running.session, running.webhook_url, retry_body, retry_id)
    assert (retry.status, retry.payload["result"]) == (200, "applied")
    assert _stored_ids(running.db) == {"stored-1", *stored, retry_id}


# --- read-only database ------------------------------------------------------


@contextlib.contextmanager
def _immutable(*paths: Path) -> Iterator[None]:
    """Make files immutable: unlike chmod, this stops root as well."""
    subprocess.run(["chattr", "+i", *map(str, paths)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


def _skip_without_chattr(directory: Path) -> None:
    probe = directory / "chattr-probe"
    probe.touch()
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    try:
        with _immutable(probe):
            pass
    except subprocess.CalledProcessError:
        pytest.skip("this file system or user cannot set the immutable attribute")
    finally:
        probe.unlink()


async def test_read_only_database_answers_503_then_recovers(
    start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    _skip_without_chattr(tmp_path)
    running = await start_sidecar()
    first = await _deliver(
        running.session, running.webhook_url, _event(STORED_SHOP, 1), "stored-1"
    )
    assert first.status == 200

    # In WAL mode a commit writes the -wal file; the main file too at checkpoints.
    with _immutable(running.db, Path(f"{running.db}-wal")):
        body = _event("read-only-shop", 2)
        refused = await _deliver(running.session, running.webhook_url, body, "ro-2")
        refused.assert_retry_later()
        assert await _lookup_status(running.session, running.lookup_url) == "active"

    retry = await _deliver(running.session, running.webhook_url, body, "ro-2")
    assert (retry.status, retry.payload["result"]) == (200, "applied")
    assert _stored_ids(running.db) == {"stored-1", "ro-2"}


# --- locked database ---------------------------------------------------------


async def test_database_locked_past_busy_timeout_answers_503_then_recovers(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar(env={"SIDECAR_BUSY_TIMEOUT_MS": "200"})
    first = await _deliver(
        running.session, running.webhook_url, _event(STORED_SHOP, 1), "stored-1"
    )
    assert first.status == 200

    body = _event("locked-shop", 2)
    other_writer = sqlite3.connect(running.db, isolation_level=None)
    other_writer.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        refused = await _deliver(running.session, running.webhook_url, body, "lock-2")
        refused.assert_retry_later()
        assert time.monotonic() - started < 5, "the busy timeout was not applied"

        # A body that would be quarantined cannot be kept either.
        not_json = await _deliver(
            running.session, running.webhook_url, b"{not json", "lock-bad"
        )
        not_json.assert_retry_later()
        assert await _lookup_status(running.session, running.lookup_url) == "active"
    finally:
        other_writer.execute("ROLLBACK")
        other_writer.close()

    retry = await _deliver(running.session, running.webhook_url, body, "lock-2")
    assert (retry.status, retry.payload["result"]) == (200, "applied")
    assert _stored_ids(running.db) == {"stored-1", "lock-2"}
    assert running.query("SELECT count(*) FROM quarantine") == [(0,)]
