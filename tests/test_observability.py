"""Metrics and log lines, read from a real child process."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import (
    SECRET,
    Process,
    Running,
    StartSidecar,
    example,
    signed_headers,
)

SHOP = "3f9c2b7e-51d4-4c1a-9e0b-7a6d2c8e1f43"
PERSONAL_DATA = (
    "merchant@example.com",
    "Ada",
    "Martin",
    "quai des Chartrons",
    "33000",
    "Bordeaux",
    "203.0.113.7",
)
_AGE = "sidecar_seconds_since_last_applied_delivery"


def _post(process: Process, body: dict[str, Any], **sign: Any) -> int:
    raw = json.dumps(body).encode()
    request = urllib.request.Request(
        process.webhook_url + "/webhooks",
        data=raw,
        headers=signed_headers(raw, **sign),
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status: int = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    return status


def _get(process: Process, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(process.lookup_url + path, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _log_lines(process: Process, count: int) -> list[str]:
    """Wait for at least `count` lines after the start-up line, and return them."""
    lines: list[str] = process.proc.stderr_lines  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while len(lines) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return list(lines)


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_deliveries_auth_failures_and_lookups(
    sidecar_process: Callable[..., Process],
) -> None:
    process = sidecar_process()
    assert _post(process, example("envelope-subscription-created.json")) == 200
    assert (
        _post(process, example("envelope-customer-updated.json"), secret="whsec_QUJD")
        == 401
    )
    assert _get(process, f"/entitlement/{SHOP}?product=mymodule")[0] == 200
    assert _get(process, "/entitlement/nobody")[0] == 404

    status, text = _get(process, "/metrics")

    assert status == 200
    assert (
        _metric(
            text,
            'sidecar_deliveries_total{event_type="subscription.created",result="applied"}',
        )
        == 1
    )
    assert _metric(text, 'sidecar_auth_failures_total{method="signature"}') == 1
    assert _metric(text, 'sidecar_lookups_total{result="trial_ended"}') == 1
    assert _metric(text, 'sidecar_lookups_total{result="unknown_shop"}') == 1
    assert _metric(text, "sidecar_lookup_duration_seconds_count") == 2
    assert _metric(text, "sidecar_last_applied_delivery_timestamp_seconds") > 0
    assert _metric(text, "sidecar_database_size_bytes") > 0
    assert "sidecar_quarantine_deliveries 0.0" in text
    assert SECRET not in text
    assert not any(value in text for value in PERSONAL_DATA)


def test_metrics_label_unknown_event_types_as_other(
    sidecar_process: Callable[..., Process],
) -> None:
    process = sidecar_process()
    body = {"eventType": "invoice.generated-for-Some-Name", "data": {}}
    assert _post(process, body) == 200

    text = _get(process, "/metrics")[1]

    assert 'event_type="other",result="ignored"' in text
    assert "Some-Name" not in text


def test_log_has_one_line_per_delivery_without_personal_data(
    sidecar_process: Callable[..., Process],
) -> None:
    process = sidecar_process()
    for name in (
        "envelope-subscription-created.json",
        "envelope-customer-updated.json",
        "envelope-payment-failed.json",
    ):
        assert _post(process, example(name), delivery_id=f"id-{name}") == 200
    rejected = example("envelope-subscription-created.json")
    rejected["data"]["subscription"]["status"] = 42
    assert _post(process, rejected, delivery_id="id-rejected") == 422
    process.terminate()

    lines = _log_lines(process, 5)
    text = "".join(lines)

    deliveries = [
        line for line in lines if "INFO sidecar.webhook: delivery id-" in line
    ]
    assert len(deliveries) == 3
    assert all("result=applied" in line for line in deliveries)
    assert "shop=3f9c2b7e-51d4-4c1a-9e0b-7a6d2c8e1f43" in deliveries[0]
    assert "product=mymodule" in deliveries[0]
    assert "quarantined delivery id-rejected" in text
    assert not any(value in text for value in PERSONAL_DATA)
    assert SECRET not in text


def test_log_json_format_carries_delivery_fields(
    sidecar_process: Callable[..., Process],
) -> None:
    process = sidecar_process(env={"SIDECAR_LOG_FORMAT": "json"})
    assert (
        _post(process, example("envelope-subscription-created.json"), delivery_id="d1")
        == 200
    )
    process.terminate()

    records = [json.loads(line) for line in _log_lines(process, 2)]
    delivery = next(r for r in records if r.get("delivery_id") == "d1")

    assert delivery["level"] == "info"
    assert delivery["event_type"] == "subscription.created"
    assert delivery["shop_id"] == SHOP
    assert delivery["result"] == "applied"
    assert isinstance(delivery["duration_ms"], float | int)
    assert "time" in delivery


def test_log_under_journald_has_priorities_and_no_timestamps(
    sidecar_process: Callable[..., Process],
) -> None:
    process = sidecar_process(env={"JOURNAL_STREAM": "8:12345"})
    assert (
        _post(
            process, example("envelope-subscription-created.json"), secret="whsec_QUJD"
        )
        == 401
    )
    process.terminate()

    lines = _log_lines(process, 2)

    assert any(line.startswith("<4>sidecar.webhook: refused") for line in lines)
    assert any(line.startswith("<6>sidecar.server: stopping") for line in lines)
    assert not any(line[:4].isdigit() for line in lines)


def test_lookups_are_logged_only_when_asked(
    sidecar_process: Callable[..., Process], tmp_path: Path
) -> None:
    quiet = sidecar_process(db=tmp_path / "quiet.db")
    chatty = sidecar_process(
        env={"SIDECAR_LOG_LOOKUPS": "true"}, db=tmp_path / "chatty.db"
    )
    for process in (quiet, chatty):
        assert _get(process, "/entitlement/nobody")[0] == 404
        process.terminate()

    assert not any("lookup shop=" in line for line in _log_lines(quiet, 2))
    assert any(
        "lookup shop=nobody" in line and "reason=unknown_shop" in line
        for line in _log_lines(chatty, 2)
    )


async def test_metrics_age_of_last_applied_delivery_survives_a_restart(
    start_sidecar: StartSidecar,
) -> None:
    first = await start_sidecar()
    status, _ = await first.post(example("envelope-subscription-created.json"))
    assert status == 200
    applied_at = int(first.clock.now)
    first.clock.now += 100
    assert _metric(await _scrape(first), _AGE) == 100

    await first.server.stop()
    second = await start_sidecar(db=first.db)
    second.clock.now = applied_at + 250

    text = await _scrape(second)

    assert _metric(text, "sidecar_last_applied_delivery_timestamp_seconds") == (
        applied_at
    )
    assert _metric(text, _AGE) == 250


async def _scrape(running: Running) -> str:
    async with running.session.get(running.lookup_url + "/metrics") as response:
        return await response.text()
