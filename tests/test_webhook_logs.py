"""The webhook listener's log lines carry no personal data and no secret."""

from __future__ import annotations

import base64
import json
import logging
import re
import string
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import (
    BASIC_TOKEN,
    EVENTS_DIR,
    SECRET,
    Running,
    StartSidecar,
    basic_headers,
)

# Fields of Billing's bodies that identify a person or where they live.
PERSONAL_FIELDS = {
    "email",
    "first_name",
    "last_name",
    "company",
    "line1",
    "line2",
    "city",
    "zip",
    "created_from_ip",
    "createdFromIp",
}
WRONG_TOKEN = "billing:not-the-password"
UNKNOWN_SECRET = "whsec_" + base64.b64encode(b"a-secret-nobody-configured!!").decode()
SECRETS = [
    SECRET,
    SECRET.removeprefix("whsec_"),
    UNKNOWN_SECRET.removeprefix("whsec_"),
    BASIC_TOKEN,
    BASIC_TOKEN.split(":")[1],
    base64.b64encode(BASIC_TOKEN.encode()).decode(),
    WRONG_TOKEN.split(":")[1],
    base64.b64encode(WRONG_TOKEN.encode()).decode(),
]


def _personal_values(value: Any, key: str = "") -> set[str]:
    if isinstance(value, dict):
        return set().union(*(_personal_values(v, k) for k, v in value.items()))
    if isinstance(value, list):
        return set().union(*(_personal_values(item, key) for item in value))
    if key in PERSONAL_FIELDS and value not in (None, ""):
        return {str(value)}
    return set()


def _examples() -> list[tuple[str, dict[str, Any]]]:
    """Every example body, with the path that gives a draft body its type."""
    found = []
    for path in sorted(EVENTS_DIR.rglob("*.json")):
        body = json.loads(path.read_text())
        url = "/webhooks"
        if path.name.startswith("draft-"):
            url += "/" + path.stem.removeprefix("draft-")
        found.append((url, body))
    return found


@pytest.fixture
def logs(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> Iterator[pytest.LogCaptureFixture]:
    """Capture every record, from the sidecar and from the libraries it uses."""
    # Started from the command line, the sidecar stops its logs propagating to
    # the root logger, where caplog listens; make sure they do here.
    monkeypatch.setattr(logging.getLogger("sidecar"), "propagate", True)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="sidecar")
    yield caplog


def _logged_text(records: list[logging.LogRecord]) -> str:
    lines = []
    for record in records:
        lines.append(record.getMessage())
        lines.append(json.dumps(getattr(record, "fields", {})))
        if record.exc_info:
            lines.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(lines)


async def _send_everything(sidecar: Running) -> None:
    """Post every example, then the same bodies in ways that get them refused."""
    ids = iter("msg_" + letter for letter in string.ascii_letters)
    examples = _examples()
    for path, body in examples:
        status, _ = await sidecar.post(body, path=path, delivery_id=next(ids))
        assert status == 200

    for path, body in examples:
        broken = json.loads(json.dumps(body))
        subscription = broken.get("data", broken).get("subscription")
        if subscription is not None:
            subscription["status"] = 5
        else:
            broken.get("data", broken)["customer"]["deleted"] = "yes"
        status, _ = await sidecar.post(broken, path=path, delivery_id=next(ids))
        assert status == 422

        raw = json.dumps(body).encode()
        status, _ = await sidecar.post(raw[:-1], path=path, delivery_id=next(ids))
        assert status == 400
        status, _ = await sidecar.post(raw, path=path, secret=UNKNOWN_SECRET)
        assert status == 401
        status, _ = await sidecar.post(
            raw, path=path, headers=basic_headers(WRONG_TOKEN), sign=False
        )
        assert status == 401

    ignored = {"eventType": "invoice.generated", "data": examples[0][1]}
    status, _ = await sidecar.post(ignored, delivery_id=next(ids))
    assert status == 200


async def test_delivery_logs_name_no_person_and_no_secret(
    start_sidecar: StartSidecar, logs: pytest.LogCaptureFixture
) -> None:
    sidecar = await start_sidecar(
        env={"SIDECAR_WEBHOOK_SECRET": SECRET, "SIDECAR_BASIC_AUTH": BASIC_TOKEN}
    )
    personal = set().union(*(_personal_values(body) for _, body in _examples()))

    await _send_everything(sidecar)
    logged = _logged_text(logs.records)

    # The capture works: one line per delivery, refusals at WARNING.
    assert (
        len(re.findall(r"^delivery msg_\w+ type=", logged, re.M))
        == len(_examples()) + 1
    )
    assert logged.count("quarantined delivery") == 2 * len(_examples())
    assert logged.count("refused a delivery") == 2 * len(_examples())
    assert {"merchant@example.com", "12 quai des Chartrons", "59000"} <= personal
    leaked = sorted(value for value in personal | set(SECRETS) if value in logged)
    assert leaked == []
