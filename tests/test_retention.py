"""Stored bodies are dropped after the retention period; the facts stay."""

from __future__ import annotations

import json

from conftest import StartSidecar, run_cli, subscription_event, wait_for

DAY_S = 86400
RETENTION_DAYS = 2


async def test_bodies_past_retention_are_dropped_at_start_keeping_the_facts(
    start_sidecar: StartSidecar,
) -> None:
    env = {"SIDECAR_RETENTION_DAYS": str(RETENTION_DAYS)}
    first = await start_sidecar(env)
    now = first.clock.now
    ages_days = {"old": RETENTION_DAYS + 1, "recent": RETENTION_DAYS - 1}
    for name, age_days in ages_days.items():
        first.clock.now = now - age_days * DAY_S
        status, _ = await first.post(
            subscription_event(f"shop-{name}", "active", resource_version=1000),
            delivery_id=f"msg-{name}",
        )
        assert status == 200
        # An authenticated body that is refused is kept in quarantine.
        status, _ = await first.post(b"[]", delivery_id=f"bad-{name}")
        assert status == 400
    await first.server.stop()

    # The purge runs as the server starts, then hourly.
    second = await start_sidecar(env, db=first.db)

    def body_kept(table: str, delivery_id: str) -> bool:
        rows = second.query(
            f"SELECT body IS NOT NULL FROM {table} WHERE delivery_id = ?", delivery_id
        )
        assert rows, f"the {table} row of {delivery_id} must stay"
        return bool(rows[0][0])

    await wait_for(lambda: not body_kept("deliveries", "msg-old"))
    await wait_for(lambda: not body_kept("quarantine", "bad-old"))
    assert body_kept("deliveries", "msg-recent")
    assert body_kept("quarantine", "bad-recent")
    stored = second.query(
        "SELECT shop_id, result, status FROM deliveries WHERE delivery_id = 'msg-old'"
    )
    assert stored == [("shop-old", "applied", "active")]
    # The entitlement table, which holds no body, is untouched, and the stored
    # facts still rebuild it.
    status, answer = await second.get("/entitlement/shop-old?product=mymodule")
    assert (status, answer["entitled"]) == (200, True)
    replay = run_cli("replay", "--dry-run", "--db", str(second.db))
    assert "would change 0 row(s)" in replay.stdout, replay.stdout + replay.stderr


async def test_body_within_retention_keeps_its_bytes(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar({"SIDECAR_RETENTION_DAYS": "30"})
    body = subscription_event("shop-kept", "active", resource_version=1000)
    await sidecar.post(body, delivery_id="msg-kept")

    assert sidecar.server.sidecar is not None
    await sidecar.server.sidecar.maintenance.purge_expired()

    stored = sidecar.query("SELECT body FROM deliveries WHERE delivery_id = 'msg-kept'")
    assert json.loads(stored[0][0]) == body
