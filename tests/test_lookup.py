"""The lookup listener: entitlement answers, input checks and the ops routes."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from conftest import (
    SECRET,
    Process,
    Running,
    StartSidecar,
    customer_event,
    signed_headers,
    subscription_event,
)
from sidecar.answers import EXTERNAL_CHECK_S

SHOP = "shop-lookup"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are capped near 108 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="sc-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


async def _get_raw(running: Running, raw_path: str) -> tuple[int, str, str]:
    """GET `raw_path` exactly as written, without the client normalising `..`."""
    session = running.lookup_session or running.session
    url = URL(running.lookup_url + raw_path, encoded=True)
    async with session.get(url) as response:
        text = await response.text()
        return response.status, response.content_type, text


async def _store_two_products(running: Running) -> None:
    for product, status in (("mymodule", "active"), ("othermodule", "paused")):
        code, _ = await running.post(subscription_event(SHOP, status, product))
        assert code == 200


@pytest.mark.parametrize(
    ("query", "product", "reason"),
    [
        ("?product=mymodule", "mymodule", "active"),
        ("?product=othermodule", "othermodule", "paused"),
    ],
)
async def test_lookup_with_product_query_reads_that_product(
    sidecar: Running, query: str, product: str, reason: str
) -> None:
    await _store_two_products(sidecar)

    status, answer = await sidecar.get(f"/entitlement/{SHOP}{query}")

    assert status == 200
    assert (answer["product"], answer["reason"]) == (product, reason)


@pytest.mark.parametrize(
    ("env", "flags", "product"),
    [
        ({}, {}, None),
        ({"SIDECAR_PRODUCT": "othermodule"}, {}, "othermodule"),
        ({}, {"product": "mymodule"}, "mymodule"),
        ({"SIDECAR_PRODUCT": "othermodule"}, {"product": "mymodule"}, "mymodule"),
    ],
    ids=["built-in-default", "env", "flag", "flag-beats-env"],
)
async def test_lookup_without_product_uses_configured_default(
    start_sidecar: StartSidecar,
    env: dict[str, str],
    flags: dict[str, str],
    product: str | None,
) -> None:
    running = await start_sidecar(env=env, **flags)
    await _store_two_products(running)

    status, answer = await running.get(f"/entitlement/{SHOP}")

    if product is None:
        # Nothing is stored for the product named "default".
        assert (status, answer["reason"]) == (404, "unknown_shop")
    else:
        assert (status, answer["product"]) == (200, product)


async def test_lookup_without_product_uses_product_flag_of_serve(
    sidecar_process: Callable[..., Process],
) -> None:
    process = sidecar_process(args=["--product", "othermodule"])
    raw = json.dumps(subscription_event(SHOP, "paused", "othermodule")).encode()

    async with aiohttp.ClientSession() as session:
        webhook_url = process.webhook_url + "/webhooks"
        async with session.post(webhook_url, data=raw, headers=signed_headers(raw)):
            pass
        async with session.get(f"{process.lookup_url}/entitlement/{SHOP}") as response:
            answer = await response.json()

    assert (answer["product"], answer["reason"]) == ("othermodule", "paused")
    assert process.terminate() == 0


@pytest.mark.parametrize(
    "shop_id",
    ["never-seen", "a" * 64, "AZaz09_-"],
    ids=["plain", "64-chars", "charset"],
)
async def test_lookup_of_unknown_shop_is_404_with_documented_body(
    sidecar: Running, shop_id: str
) -> None:
    status, content_type, text = await _get_raw(sidecar, f"/entitlement/{shop_id}")

    assert (status, content_type) == (404, "application/json")
    assert json.loads(text) == {
        "shop_id": shop_id,
        "entitled": False,
        "status": "unknown",
        "reason": "unknown_shop",
    }


async def test_lookup_of_shop_known_only_from_customer_events_is_unknown(
    sidecar: Running,
) -> None:
    code, _ = await sidecar.post(
        customer_event(SHOP, deleted=False, resource_version=1)
    )
    assert code == 200

    status, answer = await sidecar.get(f"/entitlement/{SHOP}?product=mymodule")

    assert (status, answer["reason"]) == (404, "unknown_shop")


@pytest.mark.parametrize(
    "write",
    [
        "UPDATE entitlements SET trial_end = '31 Dec 2027' WHERE shop_id = ?",
        "UPDATE entitlements SET current_term_end = x'00ff' WHERE shop_id = ?",
        "UPDATE entitlements SET plan = x'ff' WHERE shop_id = ?",
        "UPDATE entitlements SET status = x'61' WHERE shop_id = ?",
    ],
)
async def test_lookup_of_row_written_wrong_by_hand_is_503(
    sidecar: Running, write: str
) -> None:
    # Such values reach the table only from an operator in sqlite3: a lookup
    # cannot answer from them, and says so as it does for a failing database.
    # The view the operator reads says the same of that row.
    await _store_two_products(sidecar)
    other = "shop-lookup-other"
    code, _ = await sidecar.post(subscription_event(other, "active"))
    assert code == 200
    with sqlite3.connect(sidecar.db) as conn:
        conn.execute(write, (SHOP,))
    await asyncio.sleep(2 * EXTERNAL_CHECK_S)

    async with sidecar.session.get(
        f"{sidecar.lookup_url}/entitlement/{SHOP}?product=mymodule"
    ) as response:
        status, retry_after = response.status, response.headers.get("Retry-After")
        answer = await response.json()
    other_status, other_answer = await sidecar.get(
        f"/entitlement/{other}?product=mymodule"
    )

    assert (status, retry_after, answer) == (
        503,
        "1",
        {"status": 503, "error": "storage unavailable"},
    )
    assert (other_status, other_answer["reason"]) == (200, "active")
    assert sidecar.query(
        "SELECT shop_id, entitled, reason, entitled_until_utc"
        " FROM entitlements_readable WHERE product = 'mymodule' ORDER BY shop_id"
    ) == [(SHOP, 0, "unreadable", None), (other, 1, "active", None)]


async def test_lookup_of_shop_with_other_product_only_is_unknown(
    sidecar: Running,
) -> None:
    await _store_two_products(sidecar)

    status, answer = await sidecar.get(f"/entitlement/{SHOP}?product=thirdmodule")

    assert (status, answer["reason"]) == (404, "unknown_shop")


@pytest.mark.parametrize(
    "raw_path",
    [
        "/entitlement/",
        "/entitlement/" + "a" * 65,
        "/entitlement/shop/extra",
        "/entitlement/shop%2Fextra",
        "/entitlement/%2F",
        "/entitlement/shop%20one",
        "/entitlement/%20",
        "/entitlement/caf%C3%A9",
        "/entitlement/%E5%BA%97",
        "/entitlement/..",
        "/entitlement/%2E%2E",
        "/entitlement/.",
        "/entitlement/shop.one",
        "/entitlement/shop%00",
        "/entitlement/shop+one",
    ],
    ids=[
        "empty",
        "65-chars",
        "slash",
        "encoded-slash",
        "only-encoded-slash",
        "space",
        "only-space",
        "latin-accent",
        "cjk",
        "dot-dot",
        "encoded-dot-dot",
        "dot",
        "inner-dot",
        "nul",
        "plus",
    ],
)
async def test_lookup_of_impossible_shop_id_is_400(
    sidecar: Running, raw_path: str
) -> None:
    status, content_type, text = await _get_raw(sidecar, raw_path)

    assert (status, content_type) == (400, "application/json")
    assert json.loads(text)["status"] == 400


@pytest.mark.parametrize(
    "query",
    ["?product=", "?product=a%2Fb", "?product=my%20module", "?product=" + "m" * 65],
    ids=["empty", "slash", "space", "65-chars"],
)
async def test_lookup_with_impossible_product_is_400(
    sidecar: Running, query: str
) -> None:
    status, content_type, text = await _get_raw(sidecar, f"/entitlement/{SHOP}{query}")

    assert (status, content_type) == (400, "application/json")
    assert "product" in json.loads(text)["error"]


async def test_lookup_with_dotted_product_is_accepted(sidecar: Running) -> None:
    code, _ = await sidecar.post(subscription_event(SHOP, "active", "my.module-2_x"))
    assert code == 200

    status, answer = await sidecar.get(f"/entitlement/{SHOP}?product=my.module-2_x")

    assert (status, answer["product"]) == (200, "my.module-2_x")


@pytest.mark.parametrize(
    ("path", "answer"),
    [("/healthz", {"status": "ok"}), ("/readyz", {"status": "ready"})],
)
async def test_ops_route_of_running_sidecar_answers_200(
    sidecar: Running, path: str, answer: dict[str, str]
) -> None:
    assert await sidecar.get(path) == (200, answer)


async def test_readyz_while_not_ready_is_503_and_healthz_still_200(
    sidecar: Running,
) -> None:
    assert sidecar.server.sidecar is not None
    sidecar.server.sidecar.ready = False

    ready_status, _ = await sidecar.get("/readyz")
    health_status, _ = await sidecar.get("/healthz")

    assert (ready_status, health_status) == (503, 200)


async def test_metrics_is_prometheus_text_counting_lookups(sidecar: Running) -> None:
    await _store_two_products(sidecar)
    for _ in range(3):
        await sidecar.get(f"/entitlement/{SHOP}?product=mymodule")
    await sidecar.get("/entitlement/nobody")

    session = sidecar.lookup_session or sidecar.session
    async with session.get(sidecar.lookup_url + "/metrics") as response:
        status, content_type = response.status, response.content_type
        text = await response.text()

    assert (status, content_type) == (200, "text/plain")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("sidecar_lookups_total", (("result", "active"),))] == 3
    assert samples[("sidecar_lookups_total", (("result", "unknown_shop"),))] == 1
    assert SECRET.removeprefix("whsec_") not in text


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 404),
        ("GET", "/entitlements/x", 404),
        ("GET", "/webhooks", 404),
        ("POST", "/webhooks", 404),
        ("POST", "/entitlement/x", 405),
        ("DELETE", "/healthz", 405),
        ("PUT", "/metrics", 405),
    ],
)
async def test_lookup_listener_other_route_is_json_error(
    sidecar: Running, method: str, path: str, status: int
) -> None:
    async with sidecar.session.request(method, sidecar.lookup_url + path) as response:
        assert (response.status, response.content_type) == (status, "application/json")
        body = await response.json()
        allow = response.headers.get("Allow")

    assert body["status"] == status
    assert isinstance(body["error"], str) and body["error"]
    assert (allow is not None) == (status == 405)


async def test_lookup_on_unix_socket_answers_lookups_and_health(
    start_sidecar: StartSidecar, short_dir: Path
) -> None:
    path = short_dir / "lookup.sock"
    running = await start_sidecar(lookup_listen=f"unix:{path}")
    code, _ = await running.post(subscription_event(SHOP, "active"))
    assert code == 200

    lookup = await running.get(f"/entitlement/{SHOP}?product=mymodule")
    health = await running.get("/healthz")

    assert running.lookup_url == "http://localhost"
    assert (lookup[0], lookup[1]["reason"]) == (200, "active")
    assert health == (200, {"status": "ok"})


async def test_lookup_on_unix_socket_replaces_stale_socket_file(
    start_sidecar: StartSidecar, short_dir: Path
) -> None:
    path = short_dir / "lookup.sock"
    # A socket file left behind by a process that was killed.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()

    running = await start_sidecar(lookup_listen=f"unix:{path}")

    assert await running.get("/healthz") == (200, {"status": "ok"})


@pytest.mark.parametrize(
    "shop", ["%0A", "shop%0Aid", "%0D%0A"], ids=["lf", "mid", "crlf"]
)
async def test_lookup_of_shop_id_with_line_break_is_400(
    sidecar: Running, shop: str
) -> None:
    status, body = await sidecar.get(f"/entitlement/{shop}")

    assert status == 400
    assert "shop id" in body["error"]


async def test_head_lookup_has_the_get_headers_and_no_body(sidecar: Running) -> None:
    code, _ = await sidecar.post(subscription_event(SHOP, "active"))
    assert code == 200
    target = f"/entitlement/{SHOP}?product=mymodule"
    async with sidecar.session.get(sidecar.lookup_url + target) as response:
        assert response.status == 200
        get_length = int(response.headers["Content-Length"])
        assert get_length == len(await response.read())

    request = f"HEAD {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await _raw_exchange(sidecar, request.encode())

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"Content-Length: {get_length}".encode() in head.split(b"\r\n")
    assert body == b""


@pytest.mark.parametrize(
    "request_line",
    [b"OPTIONS * HTTP/1.1", b"CONNECT 127.0.0.1:1 HTTP/1.1"],
    ids=["asterisk", "authority"],
)
async def test_request_target_that_is_no_path_is_json_404(
    sidecar: Running, request_line: bytes
) -> None:
    request = request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n"

    answer = await _raw_exchange(sidecar, request)

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ")
    assert json.loads(body)["status"] == 404


async def test_lookup_with_expect_continue_gets_its_answer_at_once(
    sidecar: Running,
) -> None:
    request = (
        f"GET /entitlement/{SHOP} HTTP/1.1\r\nHost: x\r\n"
        "Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )

    answer = await _raw_exchange(sidecar, request.encode())

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ")
    assert json.loads(body)["reason"] == "unknown_shop"


async def _raw_exchange(running: Running, request: bytes) -> bytes:
    """Send raw bytes to the lookup listener; everything it sends back until close."""
    address = URL(running.lookup_url)
    assert address.host is not None and address.port is not None
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
