"""Hostile input on both listeners: never a server error, never a stray write.

Generated bodies, headers and paths are sent to the real listeners, some as raw
bytes that no well-behaved client would send. Whatever arrives, the answer is
not a 5xx other than 503, and a refused request leaves the stored deliveries
and entitlements as they were (only the quarantine may keep an authenticated
body). A last test runs schemathesis against a child sidecar, from the OpenAPI
document the lookup listener serves.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes, urlsplit

import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from standardwebhooks.webhooks import Webhook

from conftest import (
    BASIC_TOKEN,
    SECRET,
    Process,
    Running,
    StartSidecar,
    basic_headers,
    spawn_sidecar,
)

# Run these alone with `pytest -m reliability`.
pytestmark = pytest.mark.reliability

FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

STORED_TABLES = ("deliveries", "entitlements", "customers")

_delivery_numbers = itertools.count()


def _new_delivery_id() -> str:
    return f"fuzz-{next(_delivery_numbers)}"


def _snapshot(sidecar: Running, tables: tuple[str, ...]) -> dict[str, Any]:
    return {
        table: sidecar.query(f"SELECT * FROM {table} ORDER BY 1") for table in tables
    }


# --- raw HTTP ----------------------------------------------------------------


async def _exchange(url: str, request: bytes) -> int | None:
    """Send raw request bytes; return the answer's status, or None if none came."""
    address = urlsplit(url)
    assert address.hostname is not None and address.port is not None
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        writer.write(request)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
    except ConnectionResetError:
        return None
    finally:
        writer.close()
    if not status_line:
        return None
    return int(status_line.split()[1])


def _request(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: localhost"]
    lines += [name + b": " + value for name, value in headers]
    lines += [b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _assert_not_a_server_error(status: int | None) -> None:
    assert status is None or status < 500 or status == 503, f"answered {status}"


# --- bodies ------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(
        ["", "\x00", "plan\x00", "\ud800", "a" * 300, "subscription.updated"]
    ),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

ENVELOPE: dict[str, Any] = {
    "eventType": "subscription.updated",
    "data": {
        "shopId": "fuzz-shop",
        "module_id": "mymodule",
        "customer": {
            "cf_shop_id": "fuzz-shop",
            "ps_shop_id": "fuzz-shop",
            "deleted": False,
            "updated_at": 1700000000,
            "resource_version": 1700000000000,
        },
        "subscription": {
            "status": "active",
            "plan_id": "mymodule-pro",
            "trial_end": 1701209600,
            "current_term_end": 1703801600,
            "updated_at": 1701209650,
            "resource_version": 1701209650789,
            "meta_data": {"module": "mymodule"},
            "subscription_items": [
                {"item_type": "plan", "item_price_id": "pro-EUR", "trial_end": 1}
            ],
            "items": [{"type": "plan", "item_id": "pro"}],
        },
    },
}
DRAFT: dict[str, Any] = {
    "event_type": "customer_updated",
    "customer": {"ps_shop_id": "fuzz-draft-shop", "deleted": True, "updated_at": 1},
    "subscription": ENVELOPE["data"]["subscription"],
}

# Every field the parser reads, as a path into ENVELOPE or DRAFT.
ENVELOPE_FIELDS: list[tuple[Any, ...]] = [
    ("eventType",),
    ("data",),
    ("data", "shopId"),
    ("data", "module_id"),
    ("data", "customer"),
    *[
        ("data", "customer", key)
        for key in ("cf_shop_id", "ps_shop_id", "deleted", "updated_at")
    ],
    ("data", "customer", "resource_version"),
    ("data", "subscription"),
    *[
        ("data", "subscription", key)
        for key in (
            "status",
            "plan_id",
            "trial_end",
            "current_term_end",
            "updated_at",
            "resource_version",
            "meta_data",
            "subscription_items",
            "items",
        )
    ],
    ("data", "subscription", "meta_data", "module"),
    *[
        ("data", "subscription", "subscription_items", 0, key)
        for key in ("item_type", "item_price_id", "trial_end")
    ],
    ("data", "subscription", "subscription_items", 0),
    *[("data", "subscription", "items", 0, key) for key in ("type", "item_id")],
]
DRAFT_FIELDS: list[tuple[Any, ...]] = [
    ("event_type",),
    ("customer",),
    ("customer", "ps_shop_id"),
    ("customer", "deleted"),
    ("customer", "updated_at"),
    ("subscription",),
]


def _replace(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(body)
    container: Any = changed
    for key in path[:-1]:
        container = container[key]
    container[path[-1]] = value
    return changed


@st.composite
def wrong_type_bodies(draw: st.DrawFn) -> bytes:
    """A valid body with one field the parser reads set to any JSON value."""
    base, fields = draw(
        st.sampled_from([(ENVELOPE, ENVELOPE_FIELDS), (DRAFT, DRAFT_FIELDS)])
    )
    path = draw(st.sampled_from(fields))
    return json.dumps(_replace(base, path, draw(json_values))).encode()


def _nested(depth: int, opening: str, closing: str, inner: str = "1") -> str:
    return opening * depth + inner + closing * depth


@st.composite
def deeply_nested_bodies(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(1, 300_000) | st.sampled_from([999, 1000, 1001, 100_000]))
    kind = draw(st.sampled_from(["list", "object", "inside-a-field"]))
    if kind == "list":
        return _nested(depth, "[", "]", "").encode()
    if kind == "object":
        return _nested(depth, '{"a":', "}").encode()
    nested = _nested(min(depth, 50_000), "[", "]")
    body = json.dumps(_replace(ENVELOPE, ("data", "subscription", "notes"), "@"))
    return body.replace('"@"', nested).encode()


@st.composite
def huge_number_bodies(draw: st.DrawFn) -> bytes:
    number = draw(
        st.sampled_from(
            ["1e400", "-1e400", "1" + "0" * 5000, "-0", "1.5", "9" * 4300, "1e-400"]
        )
        | st.integers().map(str)
        | st.floats(allow_nan=False).map(repr)
    )
    path = draw(st.sampled_from([p for p in ENVELOPE_FIELDS if len(p) > 2]))
    return json.dumps(_replace(ENVELOPE, path, "@")).replace('"@"', number).encode()


@st.composite
def broken_encoding_bodies(draw: st.DrawFn) -> bytes:
    valid = json.dumps(ENVELOPE).encode()
    position = draw(st.integers(0, len(valid)))
    inserted = draw(
        st.sampled_from([b"\xff", b"\xc3\x28", b"\x00", b"\xed\xa0\x80", b"\xf8\x88"])
        | st.binary(min_size=1, max_size=4)
    )
    return valid[:position] + inserted + valid[position:]


hostile_bodies = st.one_of(
    json_values.map(lambda value: json.dumps(value).encode()),
    wrong_type_bodies(),
    deeply_nested_bodies(),
    huge_number_bodies(),
    broken_encoding_bodies(),
    st.binary(max_size=200),
)


@FUZZ_SETTINGS
@given(body=hostile_bodies, event_type=st.none() | st.text(max_size=30))
@example(body=b"\x00" * 10, event_type=None)
@example(body=b'{"eventType": "subscription.updated\\u0000"}', event_type=None)
async def test_webhook_with_hostile_body_never_fails_and_keeps_refusals_apart(
    sidecar: Running, body: bytes, event_type: str | None
) -> None:
    delivery_id = _new_delivery_id()
    path = "/webhooks"
    if event_type is not None:
        path += "/" + quote_from_bytes(event_type.encode(), safe="")
    before = _snapshot(sidecar, STORED_TABLES)

    status, answer = await sidecar.post(body, path=path, delivery_id=delivery_id)

    _assert_not_a_server_error(status)
    assert status in (200, 400, 404, 413, 422), (status, answer)
    if status == 200:
        assert answer["result"] in ("applied", "stale", "duplicate", "ignored")
        return
    assert _snapshot(sidecar, STORED_TABLES) == before
    if status in (400, 422):
        assert sidecar.query(
            "SELECT status FROM quarantine WHERE delivery_id = ?", delivery_id
        ) == [(status,)]


# --- headers -----------------------------------------------------------------

VALID_BODY = json.dumps(
    _replace(ENVELOPE, ("data", "subscription", "status"), "in_trial")
).encode()

# Header values are sent as raw bytes. The webhook-id and webhook-signature
# values stay valid UTF-8 here: bytes that are not are covered by
# test_signature_header_with_invalid_utf8_is_refused below.
header_text = st.text(max_size=60).map(str.encode)
header_bytes = st.binary(max_size=60)
# Most checks run only once the timestamp is within the window, so about half
# of the generated timestamps are current ones.
current_timestamps = st.integers(-300, 300).map(
    lambda offset: str(int(time.time()) + offset).encode()
)
hostile_timestamps = st.one_of(
    st.integers().map(lambda number: str(number).encode()),
    st.floats().map(lambda number: repr(number).encode()),
    st.sampled_from(
        [b"", b"nan", b"inf", b"-inf", b"1e400", b" 1 ", b"0x10", b"1_700_000_000"]
    ),
    st.just("\u0661\u0667\u0660\u0660".encode()),
    header_bytes,
)
delivery_ids = st.one_of(
    st.builds(_new_delivery_id).map(str.encode),
    st.sampled_from([b"", b" ", b"a b", b"x" * 201, b"\t", b"id,other"]),
    header_text,
)


@st.composite
def signature_lists(draw: st.DrawFn, genuine: bytes) -> bytes:
    entries = draw(
        st.lists(
            st.one_of(
                st.just(genuine),
                st.binary(max_size=32).map(lambda raw: b"v1," + base64.b64encode(raw)),
                st.sampled_from([b"v1,", b"v2,abc", b"v1", b",", b"v1,=="]),
                header_text,
            ),
            max_size=5,
        )
    )
    separator = draw(st.sampled_from([b" ", b"  ", b",", b"\t"]))
    return separator.join(entries)


def _genuine_signature(delivery_id: bytes, timestamp: bytes, body: bytes) -> bytes:
    """The correct signature when id and timestamp can be signed at all."""
    try:
        seconds = float(timestamp.decode())
        moment = datetime.fromtimestamp(seconds, UTC)
        return Webhook(SECRET).sign(delivery_id.decode(), moment, body).encode()
    except (ValueError, OverflowError, OSError):
        return b"v1,bm90IGEgc2lnbmF0dXJl"


@st.composite
def authorization_values(draw: st.DrawFn) -> bytes:
    return draw(
        st.one_of(
            st.just(basic_headers()["Authorization"].encode()),
            st.just(b"Basic " + base64.b64encode(BASIC_TOKEN.encode()) + b"="),
            st.binary(max_size=40).map(lambda raw: b"Basic " + base64.b64encode(raw)),
            st.sampled_from([b"Basic", b"Basic ", b"Bearer abc", b"basic  x", b""]),
            header_bytes,
        )
    )


@st.composite
def hostile_headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    prefix = draw(st.sampled_from([b"webhook-", b"svix-", b"Webhook-"]))
    delivery_id = draw(delivery_ids)
    timely = draw(st.booleans())
    timestamp = draw(current_timestamps if timely else hostile_timestamps)
    genuine = _genuine_signature(delivery_id, timestamp, VALID_BODY)
    candidates = [
        (prefix + b"id", delivery_id),
        (prefix + b"timestamp", timestamp),
        (prefix + b"signature", draw(signature_lists(genuine))),
        (b"Authorization", draw(authorization_values())),
    ]
    # Each header is usually there: leaving one out is one more way to fail.
    present = [header for header in candidates if draw(st.integers(0, 4))]
    return [*present, (b"Content-Type", b"application/json")]


@pytest.fixture
async def sidecar_with_both_methods(start_sidecar: StartSidecar) -> Running:
    return await start_sidecar(env={"SIDECAR_BASIC_AUTH": BASIC_TOKEN})


@FUZZ_SETTINGS
@given(headers=hostile_headers())
async def test_webhook_with_hostile_auth_headers_never_fails_or_stores_refusals(
    sidecar_with_both_methods: Running, headers: list[tuple[bytes, bytes]]
) -> None:
    sidecar = sidecar_with_both_methods
    before = _snapshot(sidecar, STORED_TABLES)
    quarantined = sidecar.query("SELECT count(*) FROM quarantine")[0][0]

    request = _request(b"POST", b"/webhooks", headers, VALID_BODY)
    status = await _exchange(sidecar.webhook_url, request)

    _assert_not_a_server_error(status)
    if status == 200:
        return
    assert _snapshot(sidecar, STORED_TABLES) == before
    # Only an authenticated request with an unusable webhook-id is quarantined.
    allowed = 1 if status == 400 else 0
    now = sidecar.query("SELECT count(*) FROM quarantine")[0][0]
    assert quarantined <= now <= quarantined + allowed, status


@pytest.mark.parametrize("header", [b"webhook-id", b"webhook-signature"])
async def test_signature_header_with_invalid_utf8_is_refused(
    sidecar: Running, header: bytes
) -> None:
    headers = {
        b"webhook-id": b"msg-1",
        b"webhook-timestamp": str(int(time.time())).encode(),
        b"webhook-signature": b"v1,bm90IGEgc2lnbmF0dXJl",
    }
    headers[header] += b"\xff"

    status = await _exchange(
        sidecar.webhook_url, _request(b"POST", b"/webhooks", list(headers.items()))
    )

    assert status == 401
    assert _snapshot(sidecar, (*STORED_TABLES, "quarantine")) == {
        table: [] for table in (*STORED_TABLES, "quarantine")
    }


# --- paths and methods -------------------------------------------------------

methods = st.sampled_from(
    [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"FOO"]
)
segments = st.one_of(
    st.binary(max_size=70).map(lambda raw: quote_from_bytes(raw).encode()),
    st.binary(max_size=20),
    st.sampled_from([b"", b"..", b"%2e%2e", b"%", b"%zz", b"a/b", b"a?b", b"%00"]),
    st.text(alphabet="abcXYZ019_-", min_size=1, max_size=70).map(str.encode),
)
queries = st.none() | st.binary(max_size=40).map(
    lambda raw: b"product=" + quote_from_bytes(raw).encode()
)


def _target(prefix: bytes, segment: bytes, query: bytes | None) -> bytes:
    return prefix + segment + (b"?" + query if query is not None else b"")


@FUZZ_SETTINGS
@given(
    method=methods,
    prefix=st.sampled_from([b"/entitlement/", b"/", b"/healthz/", b"/metrics", b""]),
    segment=segments,
    query=queries,
)
async def test_lookup_listener_with_hostile_paths_never_fails_or_writes(
    sidecar: Running,
    method: bytes,
    prefix: bytes,
    segment: bytes,
    query: bytes | None,
) -> None:
    before = _snapshot(sidecar, (*STORED_TABLES, "quarantine"))

    request = _request(method, _target(prefix, segment, query), [])
    status = await _exchange(sidecar.lookup_url, request)

    _assert_not_a_server_error(status)
    assert _snapshot(sidecar, (*STORED_TABLES, "quarantine")) == before


@FUZZ_SETTINGS
@given(
    method=methods,
    prefix=st.sampled_from([b"/webhooks/", b"/webhooks", b"/", b"/webhooks//"]),
    segment=segments,
    query=queries,
)
async def test_webhook_listener_with_hostile_paths_never_fails(
    sidecar: Running,
    method: bytes,
    prefix: bytes,
    segment: bytes,
    query: bytes | None,
) -> None:
    body = json.dumps({"customer": {"ps_shop_id": "path-shop", "deleted": False}})
    headers = [(b"Authorization", basic_headers()["Authorization"].encode())]

    request = _request(method, _target(prefix, segment, query), headers, body.encode())
    status = await _exchange(sidecar.webhook_url, request)

    _assert_not_a_server_error(status)


# --- schemathesis, from the OpenAPI document ---------------------------------

OPENAPI = Path(__file__).resolve().parents[1] / "openapi.yaml"


def _operations() -> dict[str, schemathesis.APIOperation[Any, Any, Any, Any]]:
    """Every operation of the document; a part that does not load is an error."""
    operations = {}
    for result in schemathesis.openapi.from_path(OPENAPI).get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operations[result.ok().label] = result.ok()
    return operations


OPERATIONS = _operations()


def _generation_cases() -> list[Any]:
    """Every operation with valid input; those that take input, with invalid too."""
    cases = []
    for label, operation in sorted(OPERATIONS.items()):
        modes = [schemathesis.GenerationMode.POSITIVE]
        inputs = (operation.path_parameters, operation.query, operation.headers)
        if operation.body or any(len(group) for group in inputs):
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        cases += [pytest.param(label, mode, id=f"{label}-{mode}") for mode in modes]
    return cases


@pytest.fixture(scope="module")
def live_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """One child sidecar, with both authentication methods, for every operation."""
    db = tmp_path_factory.mktemp("openapi") / "sidecar.db"
    process = spawn_sidecar(db, {"SIDECAR_BASIC_AUTH": BASIC_TOKEN})
    yield process
    assert process.terminate() == 0


def test_openapi_document_served_by_lookup_listener_is_the_shipped_one(
    live_sidecar: Process,
) -> None:
    with urllib.request.urlopen(live_sidecar.lookup_url + "/openapi.yaml") as served:
        assert served.read().decode() == OPENAPI.read_text()


@pytest.mark.parametrize(("label", "mode"), _generation_cases())
def test_openapi_operation_on_live_sidecar_conforms_without_server_error(
    live_sidecar: Process, label: str, mode: schemathesis.GenerationMode
) -> None:
    operation = OPERATIONS[label]
    on_webhook_listener = operation.path.startswith("/webhooks")
    base_url = (
        live_sidecar.webhook_url if on_webhook_listener else live_sidecar.lookup_url
    )

    @settings(max_examples=40, deadline=None)
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(
            base_url=base_url,
            headers=basic_headers(),
            checks=[
                not_a_server_error,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
                response_headers_conformance,
            ],
            timeout=10,
        )

    call()
