"""Webhook authentication: Standard Webhooks signatures and HTTP Basic."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time

import pytest

from conftest import (
    BASIC_TOKEN,
    OTHER_SECRET,
    SECRET,
    Running,
    StartSidecar,
    basic_headers,
    example,
    signed_headers,
)

BODY = json.dumps(example("envelope-subscription-created.json")).encode()
UNKNOWN_SECRET = "whsec_" + base64.b64encode(b"nobody-configured-this-key!!").decode()
BASIC_ONLY = {"SIDECAR_WEBHOOK_SECRET": "", "SIDECAR_BASIC_AUTH": BASIC_TOKEN}


def _signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """Sign `<id>.<timestamp>.<body>` exactly as the three strings are given."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _nothing_stored(sidecar: Running) -> bool:
    tables = ("deliveries", "entitlements", "customers", "quarantine")
    return all(sidecar.query(f"SELECT * FROM {table}") == [] for table in tables)


async def _failures_by_method(sidecar: Running) -> dict[str, float]:
    _, answer = await sidecar.get("/metrics")
    pattern = r'^sidecar_auth_failures_total\{method="(\w+)"\} (\S+)$'
    return {
        method: float(count)
        for method, count in re.findall(pattern, answer["_text"], re.MULTILINE)
    }


# --- Standard Webhooks signatures ---------------------------------------------


@pytest.mark.parametrize("prefix", ["webhook-", "svix-"])
async def test_signature_with_either_header_prefix_is_accepted(
    sidecar: Running, prefix: str
) -> None:
    status, answer = await sidecar.post(BODY, prefix=prefix, delivery_id="msg_one")

    assert (status, answer["result"]) == (200, "applied")
    assert sidecar.query("SELECT delivery_id FROM deliveries") == [("msg_one",)]


@pytest.mark.parametrize(
    "arrangement",
    [
        "{other} {valid}",
        "{valid} {other}",
        "v2,{raw} {valid}",
        "{other} {other} {valid}",
    ],
)
async def test_signature_header_with_one_matching_entry_is_accepted(
    sidecar: Running, arrangement: str
) -> None:
    headers = signed_headers(BODY)
    other = signed_headers(BODY, secret=OTHER_SECRET, delivery_id=headers["webhook-id"])
    valid = headers["webhook-signature"]
    headers["webhook-signature"] = arrangement.format(
        valid=valid, other=other["webhook-signature"], raw=valid.removeprefix("v1,")
    )

    status, answer = await sidecar.post(BODY, headers=headers, sign=False)

    assert (status, answer["result"]) == (200, "applied")


@pytest.mark.parametrize(
    "configured",
    [
        f"{SECRET} {OTHER_SECRET}",
        f"{OTHER_SECRET},{SECRET}",
        f"  {OTHER_SECRET} ,\n {SECRET}  ",
    ],
    ids=["spaces", "comma", "mixed"],
)
@pytest.mark.parametrize("signing_secret", [SECRET, OTHER_SECRET])
async def test_signature_with_any_configured_secret_is_accepted(
    start_sidecar: StartSidecar, configured: str, signing_secret: str
) -> None:
    sidecar = await start_sidecar(env={"SIDECAR_WEBHOOK_SECRET": configured})

    status, answer = await sidecar.post(BODY, secret=signing_secret)

    assert (status, answer["result"]) == (200, "applied")


async def test_signature_with_unknown_secret_is_rejected(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar(
        env={"SIDECAR_WEBHOOK_SECRET": f"{SECRET} {OTHER_SECRET}"}
    )

    status, answer = await sidecar.post(BODY, secret=UNKNOWN_SECRET)

    assert status == 401
    assert answer["error"] == "no signature matches a configured secret"
    assert _nothing_stored(sidecar)


@pytest.mark.parametrize("tampered", ["body", "id", "timestamp", "signature"])
async def test_signature_over_different_content_is_rejected(
    sidecar: Running, tampered: str
) -> None:
    headers = signed_headers(BODY, delivery_id="msg_original")
    body = BODY
    if tampered == "body":
        body = BODY.replace(b'"in_trial"', b'"active"')
    elif tampered == "id":
        headers["webhook-id"] = "msg_other"
    elif tampered == "timestamp":
        headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) - 1)
    else:
        signature = bytearray(base64.b64decode(headers["webhook-signature"][3:]))
        signature[0] ^= 1
        headers["webhook-signature"] = "v1," + base64.b64encode(signature).decode()

    status, _ = await sidecar.post(body, headers=headers, sign=False)

    assert status == 401
    assert _nothing_stored(sidecar)


@pytest.mark.parametrize(
    ("offset_s", "status"),
    [
        (0, 200),
        (-298, 200),
        (298, 200),
        (-302, 401),
        (302, 401),
        (-3 * 86400, 401),
        (365 * 86400, 401),
    ],
)
async def test_signature_timestamp_is_accepted_only_within_five_minutes(
    sidecar: Running, offset_s: int, status: int
) -> None:
    answer_status, answer = await sidecar.post(BODY, timestamp=time.time() + offset_s)

    assert answer_status == status
    if status == 401:
        assert "5 minutes" in answer["error"]
        assert _nothing_stored(sidecar)


@pytest.mark.parametrize("digits", [21, 4000, 6000])
async def test_signature_with_a_timestamp_of_many_digits_is_rejected(
    sidecar: Running, digits: int
) -> None:
    # Far past the window, and past the length int() reads by default.
    timestamp = "9" * digits
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": timestamp,
        "webhook-signature": _signature(SECRET, "msg_1", timestamp, BODY),
    }

    status, answer = await sidecar.post(BODY, headers=headers, sign=False)

    assert status == 401
    assert "5 minutes" in answer["error"]
    assert _nothing_stored(sidecar)


@pytest.mark.parametrize(
    "timestamp",
    ["", "abc", "{now}.0", "{now}.5", "+{now}", "{now}e0", "0x{now}", "-1", "NaN"],
)
async def test_signature_with_timestamp_not_in_unix_seconds_is_rejected(
    sidecar: Running, timestamp: str
) -> None:
    now = str(int(time.time()))
    text = timestamp.format(now=now)
    # Sign both the text as sent and the whole seconds it may be read as, so
    # the timestamp's form is the only thing wrong.
    signatures = {_signature(SECRET, "msg_1", value, BODY) for value in (text, now)}
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": text,
        "webhook-signature": " ".join(sorted(signatures)),
    }

    status, answer = await sidecar.post(BODY, headers=headers, sign=False)

    assert status == 401
    assert "webhook-timestamp" in answer["error"]
    assert _nothing_stored(sidecar)


@pytest.mark.parametrize("prefix", ["webhook-", "svix-"])
@pytest.mark.parametrize("missing", ["id", "timestamp", "signature"])
async def test_signature_without_one_of_its_headers_is_rejected(
    sidecar: Running, prefix: str, missing: str
) -> None:
    headers = signed_headers(BODY, prefix=prefix)
    del headers[prefix + missing]

    status, answer = await sidecar.post(BODY, headers=headers, sign=False)

    assert status == 401
    assert "required" in answer["error"]
    assert _nothing_stored(sidecar)


@pytest.mark.parametrize(
    "signature",
    [
        "garbage",
        "v1,",
        "v1,not base64 at all!",
        "v1,AAAA",
        ",",
        "v1," + "A" * 4000,
        "v1;{valid}",
        "{valid}x",
    ],
)
async def test_signature_header_with_garbage_is_rejected(
    sidecar: Running, signature: str
) -> None:
    headers = signed_headers(BODY)
    valid = headers["webhook-signature"].removeprefix("v1,")
    headers["webhook-signature"] = signature.format(valid=valid)

    status, answer = await sidecar.post(BODY, headers=headers, sign=False)

    assert status == 401
    assert answer["error"] == "no signature matches a configured secret"
    assert _nothing_stored(sidecar)


async def test_request_without_any_authentication_is_rejected(
    sidecar: Running,
) -> None:
    status, answer = await sidecar.post(BODY, sign=False)

    assert status == 401
    assert "webhook-signature" in answer["error"]
    assert _nothing_stored(sidecar)


# --- HTTP Basic ---------------------------------------------------------------


@pytest.mark.parametrize(
    "configured",
    [
        BASIC_TOKEN,
        base64.b64encode(BASIC_TOKEN.encode()).decode(),
        f"first:token\n{BASIC_TOKEN}  third:one",
    ],
    ids=["user:pass", "base64", "several"],
)
async def test_basic_with_configured_token_is_accepted(
    start_sidecar: StartSidecar, configured: str
) -> None:
    sidecar = await start_sidecar(
        env={"SIDECAR_WEBHOOK_SECRET": "", "SIDECAR_BASIC_AUTH": configured}
    )

    status, answer = await sidecar.post(BODY, headers=basic_headers(), sign=False)

    assert (status, answer["result"]) == (200, "applied")


async def test_basic_scheme_name_in_any_case_is_accepted(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar(env=BASIC_ONLY)
    token = basic_headers()["Authorization"].split(" ", 1)[1]

    status, _ = await sidecar.post(
        BODY, headers={"Authorization": f"basic {token}"}, sign=False
    )

    assert status == 200


ENCODED_TOKEN = base64.b64encode(BASIC_TOKEN.encode()).decode()


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic " + base64.b64encode(b"billing:wrong-pass").decode(),
        "Basic " + base64.b64encode(b"other:s3cret-pass").decode(),
        "Basic " + ENCODED_TOKEN[:-2],
        "Basic " + ENCODED_TOKEN + "AA",
        f"Basic {BASIC_TOKEN}",
        f"Bearer {ENCODED_TOKEN}",
        f"Digest {ENCODED_TOKEN}",
        ENCODED_TOKEN,
        "Basic",
        "Basic   ",
        "Basic \u00e9t\u00e9",
    ],
)
async def test_basic_with_wrong_token_or_scheme_is_rejected(
    start_sidecar: StartSidecar, authorization: str
) -> None:
    sidecar = await start_sidecar(env=BASIC_ONLY)

    status, answer = await sidecar.post(
        BODY, headers={"Authorization": authorization}, sign=False
    )

    assert status == 401
    assert "Basic" in answer["error"] or "basic" in answer["error"]
    assert _nothing_stored(sidecar)


async def test_basic_only_listener_rejects_a_valid_signature(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar(env=BASIC_ONLY)

    status, _ = await sidecar.post(BODY)

    assert status == 401
    assert _nothing_stored(sidecar)


@pytest.mark.parametrize(
    ("good", "bad"),
    [("signature", "basic"), ("basic", "signature")],
)
async def test_request_passing_one_of_two_configured_methods_is_accepted(
    start_sidecar: StartSidecar, good: str, bad: str
) -> None:
    sidecar = await start_sidecar(
        env={"SIDECAR_WEBHOOK_SECRET": SECRET, "SIDECAR_BASIC_AUTH": BASIC_TOKEN}
    )
    secret = SECRET if good == "signature" else UNKNOWN_SECRET
    headers = signed_headers(BODY, secret=secret)
    token = BASIC_TOKEN if good == "basic" else "billing:wrong"
    headers.update(basic_headers(token))

    status, answer = await sidecar.post(BODY, headers=headers, sign=False)

    assert (status, answer["result"]) == (200, "applied")


# --- no authentication configured ----------------------------------------------


@pytest.mark.parametrize("with_headers", [False, True])
async def test_loopback_listener_without_configured_auth_accepts_any_request(
    start_sidecar: StartSidecar, with_headers: bool
) -> None:
    sidecar = await start_sidecar(env={"SIDECAR_WEBHOOK_SECRET": ""})
    headers = signed_headers(BODY, secret=UNKNOWN_SECRET) if with_headers else {}

    status, answer = await sidecar.post(BODY, headers=headers, sign=False)

    assert (status, answer["result"]) == (200, "applied")


# --- how a refusal looks ------------------------------------------------------


async def test_auth_failures_are_counted_by_method(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar(
        env={"SIDECAR_WEBHOOK_SECRET": SECRET, "SIDECAR_BASIC_AUTH": BASIC_TOKEN}
    )

    await sidecar.post(BODY, secret=UNKNOWN_SECRET)
    await sidecar.post(BODY, timestamp=time.time() - 3600)
    await sidecar.post(BODY, headers=basic_headers("billing:wrong"), sign=False)
    await sidecar.post(BODY, sign=False)
    await sidecar.post(BODY, sign=False)
    await sidecar.post(BODY)

    assert await _failures_by_method(sidecar) == {
        "signature": 2.0,
        "basic": 1.0,
        "none": 2.0,
    }


async def _refusals(sidecar: Running) -> list[tuple[int, bytes]]:
    """Send one request for each way to fail, and return the raw answers."""
    attempts = [
        signed_headers(BODY, secret=UNKNOWN_SECRET),
        signed_headers(BODY, timestamp=time.time() - 3600),
        basic_headers("billing:wrong-pass"),
        {"Authorization": "Bearer " + SECRET},
        {},
    ]
    answers = []
    for headers in attempts:
        async with sidecar.session.post(
            sidecar.webhook_url + "/webhooks", data=BODY, headers=headers
        ) as response:
            answers.append((response.status, await response.read()))
    return answers


async def test_refusal_is_short_json_that_names_no_secret(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar(
        env={"SIDECAR_WEBHOOK_SECRET": SECRET, "SIDECAR_BASIC_AUTH": BASIC_TOKEN}
    )
    secrets = [
        SECRET,
        SECRET.removeprefix("whsec_"),
        UNKNOWN_SECRET.removeprefix("whsec_"),
        BASIC_TOKEN,
        "s3cret-pass",
        ENCODED_TOKEN,
        base64.b64encode(b"billing:wrong-pass").decode(),
    ]

    answers = await _refusals(sidecar)
    _, metrics = await sidecar.get("/metrics")

    for status, raw in answers:
        assert status == 401
        assert len(raw) < 160
        payload = json.loads(raw)
        assert set(payload) == {"status", "error"}
        for secret in secrets:
            assert secret not in raw.decode()
    for secret in secrets:
        assert secret not in metrics["_text"]
    assert _nothing_stored(sidecar)
