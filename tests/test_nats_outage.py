"""Multi-host mode when NATS is away, the stream is short, or credentials matter.

These run one real nats-server (a stream with one replica) and sidecar child
processes: lookups never depend on NATS, webhooks are refused with 503 while
nothing can acknowledge them, and a host that missed messages the stream no
longer holds stays unready until a backup is restored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
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
from conftest import Process, run_cli, subscription_event
from nats_cluster import NatsCluster

PASSWORD = "nats-pass-4f1e9c"
WRONG_PASSWORD = "nats-wrong-77a2b0"


@pytest.fixture
async def nats1(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    async with running_nats(tmp_path, 1) as server:
        yield server


@pytest.fixture
def start(
    sidecar_process: Callable[..., Process],
    session: aiohttp.ClientSession,
    nats1: NatsCluster,
    tmp_path: Path,
) -> StartHost:
    def launch(name: str, env: dict[str, str] | None = None) -> Host:
        db = tmp_path / f"{name}.db"
        return start_host(
            sidecar_process, session, nats1.urls, name, db, replicas=1, env=env
        )

    return launch


async def _lookup_status(host: Host, shop_id: str) -> tuple[int, str]:
    status, answer = await host.get(f"/entitlement/{shop_id}?product={PRODUCT}")
    return status, str(answer.get("status"))


async def test_with_nats_down_webhook_is_503_and_lookups_keep_answering(
    start: StartHost, nats1: NatsCluster
) -> None:
    host = start("host-a")
    await host.wait_ready()
    status, answer, _ = await host.post(subscription_event("shop-1", "active"), "d1")
    assert (status, answer["result"]) == (200, "applied")

    nats1.nodes[0].kill()

    status, answer, headers = await host.post(
        subscription_event("shop-1", "cancelled"), "d2"
    )
    assert status == 503
    assert "Retry-After" in headers
    assert await _lookup_status(host, "shop-1") == (200, "active")
    status, ready = await host.get("/readyz")
    assert (status, ready["error"]) == (503, "not connected to NATS")
    assert await host.metric("sidecar_stream_connected") == 0
    assert await host.metric("sidecar_stream_publish_failures_total") >= 1
    # Refusals never needed NATS: they are still answered and kept here.
    status, _, _ = await host.post(b"not json", "d3")
    assert status == 400
    assert host.query("SELECT delivery_id FROM deliveries") == [("d1",)]

    await nats1.start_node(nats1.nodes[0])
    await host.wait_ready()
    status, answer, _ = await host.post(subscription_event("shop-1", "cancelled"), "d2")
    assert (status, answer["result"]) == (200, "applied")
    assert await _lookup_status(host, "shop-1") == (200, "cancelled")


async def test_host_started_while_nats_is_down_answers_lookups_from_its_database(
    start: StartHost, nats1: NatsCluster
) -> None:
    host = start("host-a")
    await host.wait_ready()
    status, _, _ = await host.post(subscription_event("shop-1", "in_trial"), "d1")
    assert status == 200
    assert host.process.terminate() == 0
    nats1.nodes[0].kill()

    restarted = start("host-a")

    assert await _lookup_status(restarted, "shop-1") == (200, "in_trial")
    status, _ = await restarted.get("/readyz")
    assert status == 503
    status, _, _ = await restarted.post(subscription_event("shop-2", "active"), "d2")
    assert status == 503
    assert restarted.process.terminate() == 0

    again = start("host-a")
    await nats1.start_node(nats1.nodes[0])
    await again.wait_ready()
    status, answer, _ = await again.post(subscription_event("shop-2", "active"), "d2")
    assert (status, answer["result"]) == (200, "applied")


async def test_answer_without_waiting_for_the_local_apply_is_202_accepted(
    start: StartHost,
) -> None:
    host = start("host-a", env={"SIDECAR_NATS_APPLY_WAIT_SECONDS": "0"})
    await host.wait_ready()

    status, answer, _ = await host.post(subscription_event("shop-1", "active"), "d1")

    assert (status, answer["result"]) == (202, "accepted")
    await wait_until(lambda: host.applied_sequence() == 1, "the delivery is applied")
    assert await _lookup_status(host, "shop-1") == (200, "active")


async def test_host_missing_purged_messages_is_unready_until_a_backup_is_restored(
    start: StartHost, nats1: NatsCluster
) -> None:
    a, b = start("host-a"), start("host-b")
    await a.wait_ready()
    for number in range(10):
        if number == 4:
            await wait_until(lambda: b.applied_sequence() == 4, "host-b is at 4")
            assert b.process.terminate() == 0
        event = subscription_event(f"shop-{number}", "active")
        status, _, _ = await a.post(event, f"d{number}")
        assert status == 200
    # As when messages pass the stream's maximum age while a host is away.
    async with nats1.jetstream() as js:
        await js.purge_stream(STREAM, seq=8)

    behind = start("host-b")
    await wait_until(lambda: "restore a backup" in behind.logs(), "it says why")

    status, ready = await behind.get("/readyz")
    assert status == 503
    assert "no longer holds deliveries 5 to 7" in ready["error"]
    assert await _lookup_status(behind, "shop-3") == (200, "active")
    assert await _lookup_status(behind, "shop-9") == (404, "unknown")
    assert behind.process.terminate() == 0

    for suffix in ("", "-wal", "-shm"):
        Path(f"{behind.db}{suffix}").unlink(missing_ok=True)
    backup = run_cli("backup", str(behind.db), env={"SIDECAR_DB": str(a.db)})
    assert backup.returncode == 0, backup.stderr
    restored = start("host-b")
    await restored.wait_ready()
    assert restored.tables() == a.tables()
    assert await _lookup_status(restored, "shop-9") == (200, "active")


async def test_nats_password_reaches_no_log_metric_or_answer(
    sidecar_process: Callable[..., Process],
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    server = NatsCluster(
        tmp_path, size=1, authorization=f'user: sidecar, password: "{PASSWORD}"'
    )
    await server.start()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "nats-password").write_text(WRONG_PASSWORD + "\n")
    try:
        refused = start_host(
            sidecar_process,
            session,
            server.urls,
            "host-a",
            tmp_path / "a.db",
            replicas=1,
            env={
                "CREDENTIALS_DIRECTORY": str(credentials),
                "SIDECAR_NATS_USER": "sidecar",
            },
        )
        await wait_until(
            lambda: "Authorization Violation" in refused.logs(), "the refusal"
        )
        _, ready = await refused.get("/readyz")
        metrics = await _metrics_text(refused)
        assert refused.process.terminate() == 0

        (credentials / "nats-password").write_text(PASSWORD + "\n")
        accepted = start_host(
            sidecar_process,
            session,
            server.urls,
            "host-a",
            tmp_path / "a.db",
            replicas=1,
            env={
                "CREDENTIALS_DIRECTORY": str(credentials),
                "SIDECAR_NATS_USER": "sidecar",
            },
        )
        await accepted.wait_ready()
        status, _, _ = await accepted.post(subscription_event("shop-1", "active"), "d")
        assert status == 200
        metrics += await _metrics_text(accepted)
        assert accepted.process.terminate() == 0
    finally:
        server.stop()

    seen = refused.logs() + accepted.logs() + metrics + str(ready)
    assert PASSWORD not in seen
    assert WRONG_PASSWORD not in seen


async def _metrics_text(host: Host) -> str:
    async with host.session.get(host.process.lookup_url + "/metrics") as response:
        return await response.text()
