"""Three sidecars sharing one stream on a three-node JetStream cluster.

Each test starts real nats-server processes and sidecar child processes on
loopback ports. Deliveries reach one host each; every host must end with the
same rows, and no acknowledged delivery may be lost to `kill -9`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from cluster_hosts import (
    PRODUCT,
    STREAM,
    Host,
    StartHost,
    running_nats,
    start_host,
    wait_until,
)
from conftest import Process, customer_event, example, subscription_event
from nats_cluster import NatsCluster


@pytest.fixture
async def nats3(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    async with running_nats(tmp_path, 3) as cluster:
        yield cluster


@pytest.fixture
def start(
    sidecar_process: Callable[..., Process],
    session: aiohttp.ClientSession,
    nats3: NatsCluster,
    tmp_path: Path,
) -> StartHost:
    def launch(name: str, db: Path | None = None) -> Host:
        db = db or tmp_path / f"{name}.db"
        return start_host(sidecar_process, session, nats3.urls, name, db, replicas=3)

    return launch


@pytest.fixture
async def hosts(start: StartHost) -> list[Host]:
    group = [start(name) for name in ("host-a", "host-b", "host-c")]
    await asyncio.gather(*(host.wait_ready() for host in group))
    return group


async def _stream_last_sequence(cluster: NatsCluster) -> int:
    return (await cluster.stream_info(STREAM)).state.last_seq


async def _all_applied(group: list[Host], sequence: int) -> None:
    for host in group:
        await wait_until(
            lambda host=host: host.applied_sequence() >= sequence,  # type: ignore[misc]
            f"{host.name} applied sequence {sequence}",
        )


def _assert_same_tables(group: list[Host]) -> None:
    first = group[0].tables()
    for host in group[1:]:
        assert host.tables() == first, f"{host.name} differs from {group[0].name}"


async def test_deliveries_sent_to_any_host_appear_identically_on_all_hosts(
    hosts: list[Host], nats3: NatsCluster
) -> None:
    a, b, c = hosts
    draft = example("draft-subscription_created.json")
    sends = [
        # Versioned by resource_version.
        (a, subscription_event("shop-1", "active", resource_version=1000), {}),
        # No version in the body: the signed webhook-timestamp orders it.
        (b, subscription_event("shop-2", "in_trial", trial_end=2_000_000_000), {}),
        # Basic auth, no version: the receiving host's clock orders it.
        (c, subscription_event("shop-3", "paused"), {"basic": True}),
        # Draft body whose type is only in the URL.
        (a, draft, {"path": "/webhooks/subscription_created"}),
        (b, customer_event("shop-1", deleted=True, resource_version=5), {}),
        (c, {"eventType": "invoice.generated", "data": {}}, {}),
    ]
    expected = ["applied"] * 5 + ["ignored"]
    for number, ((host, body, options), result) in enumerate(
        zip(sends, expected, strict=True)
    ):
        status, answer, _ = await host.post(body, f"spread-{number}", **options)
        assert (status, answer["result"]) == (200, result), host.name

    # A refusal is answered and kept by the receiving host alone.
    status, _, _ = await b.post({"eventType": "subscription.updated"}, "refused")
    assert status == 422

    await _all_applied(hosts, len(sends))
    assert await _stream_last_sequence(nats3) == len(sends)
    _assert_same_tables(hosts)
    assert len(a.query("SELECT * FROM deliveries")) == len(sends)
    assert [host.query("SELECT delivery_id FROM quarantine") for host in hosts] == [
        [],
        [("refused",)],
        [],
    ]
    for host in hosts:
        status, answer = await host.get(f"/entitlement/shop-2?product={PRODUCT}")
        assert (status, answer["status"], answer["entitled"]) == (200, "in_trial", True)
        status, answer = await host.get(f"/entitlement/shop-1?product={PRODUCT}")
        assert answer["reason"] == "customer_deleted"


async def test_duplicate_sent_to_two_hosts_at_once_is_applied_once(
    hosts: list[Host], nats3: NatsCluster
) -> None:
    a, b, c = hosts
    body = json.dumps(subscription_event("shop-dup", "active")).encode()

    answers = await asyncio.gather(a.post(body, "twice"), b.post(body, "twice"))

    assert sorted(answer["result"] for _, answer, _ in answers) == [
        "applied",
        "duplicate",
    ]
    status, answer, _ = await c.post(body, "twice")
    assert (status, answer["result"]) == (200, "duplicate")
    assert await _stream_last_sequence(nats3) == 1
    await _all_applied(hosts, 1)
    _assert_same_tables(hosts)
    assert a.query("SELECT delivery_id, result FROM deliveries") == [
        ("twice", "applied")
    ]


async def test_wiped_host_rebuilds_from_the_start_of_the_stream(
    hosts: list[Host], start: StartHost
) -> None:
    a, _, c = hosts
    for number in range(20):
        event = subscription_event(
            f"shop-{number % 5}", "active", resource_version=1000 + number
        )
        status, _, _ = await a.post(event, f"before-wipe-{number}")
        assert status == 200
    await _all_applied(hosts, 20)
    assert c.process.terminate() == 0

    # Its durable consumer stays on the server, positioned after message 20.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{c.db}{suffix}").unlink(missing_ok=True)
    rebuilt = start("host-c", db=c.db)
    await rebuilt.wait_ready()

    assert rebuilt.tables() == a.tables()
    status, answer = await rebuilt.get(f"/entitlement/shop-4?product={PRODUCT}")
    assert (status, answer["status"]) == (200, "active")


@dataclass(frozen=True)
class Sent:
    delivery_id: str
    shop_id: str
    version: int
    body: bytes


def _deliveries(count: int) -> list[Sent]:
    """A history over ten shops, every fifth delivery older than the last."""
    sent = []
    for number in range(count):
        shop_id = f"kill-{number % 10}"
        version = 1_700_000_000_000 + 10 * number - (25 if number % 5 == 4 else 0)
        status = ("active", "in_trial", "paused", "cancelled")[number % 4]
        body = subscription_event(shop_id, status, resource_version=version)
        sent.append(Sent(f"kill-{number}", shop_id, version, json.dumps(body).encode()))
    return sent


async def _deliver(sent: Sent, group: list[Host], first: int) -> str:
    """Send like Billing behind nginx: on 503 or a dead host, try the next one."""
    attempt = first
    while True:
        host = group[attempt % len(group)]
        attempt += 1
        try:
            status, answer, _ = await host.post(sent.body, sent.delivery_id)
        except (aiohttp.ClientError, TimeoutError):
            await asyncio.sleep(0.05)
            continue
        if status == 503:
            await asyncio.sleep(0.05)
            continue
        assert status in (200, 202), f"{sent.delivery_id}: {status} {answer}"
        return str(answer["result"])


async def _sender(
    queue: asyncio.Queue[tuple[int, Sent]],
    group: list[Host],
    acked: dict[str, str],
    enough: asyncio.Event,
    kill_after: int,
) -> None:
    while not queue.empty():
        number, sent = queue.get_nowait()
        acked[sent.delivery_id] = await _deliver(sent, group, number)
        if len(acked) >= kill_after:
            enough.set()


async def _stream_leader(cluster: NatsCluster) -> str:
    info = await cluster.stream_info(STREAM)
    assert info.cluster is not None and info.cluster.leader
    return info.cluster.leader


@pytest.mark.slow
async def test_kill_9_of_a_nats_node_and_a_sidecar_loses_no_acknowledged_delivery(
    hosts: list[Host], nats3: NatsCluster, start: StartHost
) -> None:
    sent = _deliveries(240)
    queue: asyncio.Queue[tuple[int, Sent]] = asyncio.Queue()
    for item in enumerate(sent):
        queue.put_nowait(item)
    acked: dict[str, str] = {}
    enough = asyncio.Event()
    senders = [
        asyncio.create_task(_sender(queue, hosts, acked, enough, kill_after=60))
        for _ in range(4)
    ]

    await asyncio.wait_for(enough.wait(), 30)
    leader = nats3.node_named(await _stream_leader(nats3))
    leader.kill()
    hosts[2].process.kill()
    await asyncio.wait_for(asyncio.gather(*senders), 50)

    assert len(acked) == len(sent)
    restarted = start("host-c", db=hosts[2].db)
    group = [hosts[0], hosts[1], restarted]
    await restarted.wait_ready()
    await _all_applied(group, await _stream_last_sequence(nats3))

    _assert_same_tables(group)
    stored = {row[0] for row in restarted.query("SELECT delivery_id FROM deliveries")}
    assert stored == set(acked)
    newest: dict[str, int] = {}
    for delivery in sent:
        newest[delivery.shop_id] = max(
            newest.get(delivery.shop_id, 0), delivery.version
        )
    assert dict(restarted.query("SELECT shop_id, version FROM entitlements")) == newest
