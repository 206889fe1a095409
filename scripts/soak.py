"""Soak one sidecar process: many deliveries and lookups, then check it held up.

Starts `python -m sidecar serve` on a fresh database, sends signed deliveries
and lookups side by side, and samples the server's resident memory and open
file descriptors as it goes. It passes when memory grew less than 10% after
warm-up, the descriptor count did not grow, every delivery was acknowledged
and `PRAGMA integrity_check` is `ok`. Not part of CI: the default run takes
several minutes.

    .venv/bin/python scripts/soak.py [--deliveries 200000] [--lookups 2000000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from standardwebhooks.webhooks import Webhook

SECRET = "whsec_" + base64.b64encode(b"soak-signing-secret-0123456789ab").decode()
PRODUCT = "mymodule"
STATUSES = ("active", "in_trial", "non_renewing", "cancelled", "paused", "future")
MAX_RSS_GROWTH = 0.10
SAMPLE_INTERVAL_S = 5.0
SETTLE_S = 1.0
_LISTENING = re.compile(r"listening for webhooks on (\S+) and lookups on (\S+),")


@dataclass
class Sample:
    elapsed_s: float
    rss_bytes: int
    open_fds: int


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    done: int = 0


def main() -> int:
    args = _parser().parse_args()
    with tempfile.TemporaryDirectory(prefix="sidecar-soak-") as workdir:
        db = Path(workdir) / "sidecar.db"
        server, webhook, lookup = _start(db)
        try:
            ok = asyncio.run(_soak(args, server.pid, webhook, lookup, db))
        finally:
            server.terminate()
            code = server.wait(30)
        if code != 0:
            print(f"the sidecar exited with {code} on SIGTERM")
            ok = False
        integrity = _integrity(db)
        print(f"PRAGMA integrity_check: {integrity}")
    ok = ok and integrity == "ok"
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=200_000)
    parser.add_argument("--lookups", type=int, default=2_000_000)
    parser.add_argument("--shops", type=int, default=20_000)
    parser.add_argument(
        "--warm-up",
        type=float,
        default=0.1,
        help="share of the work done before the memory baseline is taken",
    )
    return parser


def _start(db: Path) -> tuple[subprocess.Popen[str], str, str]:
    env = {key: value for key, value in os.environ.items() if "SIDECAR_" not in key}
    env.update(
        SIDECAR_DB=str(db),
        SIDECAR_WEBHOOK_SECRET=SECRET,
        SIDECAR_WEBHOOK_LISTEN="127.0.0.1:0",
        SIDECAR_LOOKUP_LISTEN="127.0.0.1:0",
        SIDECAR_PRODUCT=PRODUCT,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        match = _LISTENING.search(line)
        if match:
            threading.Thread(target=_echo, args=(proc,), daemon=True).start()
            return proc, match.group(1), match.group(2)
        print(line, end="", file=sys.stderr)
    raise SystemExit("the sidecar did not start")


def _echo(proc: subprocess.Popen[str]) -> None:
    # The one INFO line per delivery would drown the report; the rest shows.
    assert proc.stderr is not None
    for line in proc.stderr:
        if " INFO " not in line:
            print("sidecar:", line, end="", file=sys.stderr)


async def _soak(
    args: argparse.Namespace, pid: int, webhook: str, lookup: str, db: Path
) -> bool:
    deliveries = _deliveries(args.shops, args.deliveries)
    ingest, lookups = Tally(), Tally()
    warm_deliveries = int(args.deliveries * args.warm_up)
    warm_lookups = int(args.lookups * args.warm_up)
    started = time.monotonic()

    print(f"warm-up: {warm_deliveries:,} deliveries, {warm_lookups:,} lookups")
    await asyncio.gather(
        _send(webhook, deliveries, warm_deliveries, 8, ingest),
        _look_up(lookup, args.shops, warm_lookups, 16, lookups),
    )
    # Closed connections take a moment to leave the server's descriptor table.
    await asyncio.sleep(SETTLE_S)
    baseline = _sample(pid, started)
    samples = [baseline]
    print(f"baseline: {_describe(baseline)}")

    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_until(stop, pid, started, samples))
    await asyncio.gather(
        _send(webhook, deliveries, args.deliveries - warm_deliveries, 8, ingest),
        _look_up(lookup, args.shops, args.lookups - warm_lookups, 16, lookups),
    )
    stop.set()
    await sampler
    await asyncio.sleep(SETTLE_S)
    final = _sample(pid, started)
    samples.append(final)

    elapsed_s = time.monotonic() - started
    peak_rss = max(sample.rss_bytes for sample in samples)
    growth = peak_rss / baseline.rss_bytes - 1
    print(f"final: {_describe(final)}; ran {elapsed_s:.0f} s")
    print(f"deliveries answered: {dict(ingest.statuses)}")
    print(f"lookups answered: {dict(lookups.statuses)}")
    print(f"peak RSS growth after warm-up: {growth:+.1%} (limit {MAX_RSS_GROWTH:.0%})")
    stored = _count(db, "SELECT count(*) FROM deliveries")
    print(f"deliveries stored: {stored:,}")

    checks = {
        "every delivery answered 200": set(ingest.statuses) == {200},
        "every delivery stored": stored == args.deliveries,
        "lookups answered 200 or 404 only": set(lookups.statuses) <= {200, 404},
        "RSS grew less than 10%": growth < MAX_RSS_GROWTH,
        "open descriptors did not grow": final.open_fds <= baseline.open_fds,
    }
    for name, passed in checks.items():
        print(f"{'ok  ' if passed else 'FAIL'} {name}")
    return all(checks.values())


def _deliveries(shops: int, count: int) -> Iterator[tuple[bytes, dict[str, str]]]:
    """Signed deliveries: each a new state of a random shop, versions rising."""
    webhook = Webhook(SECRET)
    rng = random.Random(7)
    base_ms = int(time.time() * 1000) - count
    for number in range(count):
        shop = f"soak-{rng.randrange(shops):06d}"
        subscription = {
            "id": f"sub-{shop}",
            "plan_id": f"{PRODUCT}-pro",
            "status": rng.choice(STATUSES),
            "trial_end": int(time.time()) + rng.randrange(-86400, 86400),
            "resource_version": base_ms + number,
            "meta_data": {"module": PRODUCT},
        }
        body = json.dumps(
            {
                "eventType": "subscription.updated",
                "data": {"shopId": shop, "subscription": subscription},
            }
        ).encode()
        delivery_id = f"msg_soak_{number}"
        now = datetime.now(UTC)
        yield (
            body,
            {
                "webhook-id": delivery_id,
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": webhook.sign(delivery_id, now, body),
                "Content-Type": "application/json",
            },
        )


async def _send(
    address: str,
    deliveries: Iterator[tuple[bytes, dict[str, str]]],
    count: int,
    senders: int,
    tally: Tally,
) -> None:
    remaining = count

    def take() -> tuple[bytes, dict[str, str]] | None:
        nonlocal remaining
        if remaining <= 0:
            return None
        remaining -= 1
        return next(deliveries)

    async def sender() -> None:
        connection = await _Connection.open(address)
        try:
            while (item := take()) is not None:
                body, headers = item
                status = await connection.request("POST", "/webhooks", headers, body)
                tally.statuses[status] += 1
                tally.done += 1
        finally:
            connection.close()

    await asyncio.gather(*(sender() for _ in range(senders)))


async def _look_up(
    address: str, shops: int, count: int, connections: int, tally: Tally
) -> None:
    rng = random.Random(11)
    remaining = count

    def path() -> str | None:
        nonlocal remaining
        if remaining <= 0:
            return None
        remaining -= 1
        # One lookup in ten is for a shop that never subscribed.
        if rng.random() < 0.1:
            return f"/entitlement/stranger-{rng.randrange(10**9)}"
        return f"/entitlement/soak-{rng.randrange(shops):06d}"

    async def client() -> None:
        connection = await _Connection.open(address)
        try:
            while (target := path()) is not None:
                status = await connection.request("GET", target, {}, b"")
                tally.statuses[status] += 1
                tally.done += 1
        finally:
            connection.close()

    await asyncio.gather(*(client() for _ in range(connections)))


class _Connection:
    """A keep-alive HTTP/1.1 connection: cheaper per request than a client library."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._host = host

    @classmethod
    async def open(cls, address: str) -> _Connection:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, address)

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> int:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self._reader.readexactly(length)
        return status

    def close(self) -> None:
        self._writer.close()


async def _sample_until(
    stop: asyncio.Event, pid: int, started: float, samples: list[Sample]
) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL_S)
        except TimeoutError:
            sample = _sample(pid, started)
            samples.append(sample)
            print(f"  {_describe(sample)}")


def _sample(pid: int, started: float) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None, "no VmRSS line in /proc/PID/status"
    rss_kib = int(match.group(1))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return Sample(time.monotonic() - started, rss_kib * 1024, fds)


def _describe(sample: Sample) -> str:
    return (
        f"t={sample.elapsed_s:.0f}s rss={sample.rss_bytes / 2**20:.1f} MiB"
        f" fds={sample.open_fds}"
    )


def _count(db: Path, sql: str) -> int:
    return int(_first_value(db, sql))


def _integrity(db: Path) -> str:
    return _first_value(db, "PRAGMA integrity_check")


def _first_value(db: Path, sql: str) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
