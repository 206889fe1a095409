"""The PHP client, run by the real `php` binary against a real sidecar."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Running, StartSidecar, example
from fake_billing import Failure, running_fake_billing

EXAMPLE_PHP = Path(__file__).resolve().parents[1] / "clients" / "php" / "example.php"
ACTIVE_SHOP = "3f9c2b7e-51d4-4c1a-9e0b-7a6d2c8e1f43"
CANCELLED_SHOP = "b71e0c9a-2f64-4d3b-8a15-c0d9e4f26a77"
UNKNOWN_SHOP = "0000-not-a-customer"


def _php() -> str:
    found = shutil.which("php")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("php is not installed; .ci/run installs php-cli and php-curl")
        pytest.skip("php is not installed (apt-get install php-cli php-curl)")
    return found


async def run_example(
    target: str, shop_id: str, *flags: str, timeout_ms: int = 5000
) -> dict[str, Any]:
    # The sidecar under test runs in pytest's own process, where one garbage
    # collection of the whole session can take longer than the client's
    # default limit of 100 ms; only the timeout test below relies on a limit.
    proc = await asyncio.create_subprocess_exec(
        _php(),
        str(EXAMPLE_PHP),
        f"--timeout-ms={timeout_ms}",
        *flags,
        target,
        shop_id,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()
    result: dict[str, Any] = json.loads(stdout)
    return result


async def _seed(sidecar: Running) -> None:
    active = example("envelope-subscription-status-updated.json")
    cancelled = example("envelope-subscription-updated-items.json")
    cancelled["data"]["subscription"]["status"] = "cancelled"
    for body in (active, cancelled):
        status, answer = await sidecar.post(body)
        assert (status, answer["result"]) == (200, "applied")


@pytest.fixture
async def short_tmp() -> AsyncIterator[Path]:
    # Unix socket paths are limited to about 100 bytes; pytest's tmp_path can
    # be longer than that.
    with tempfile.TemporaryDirectory(prefix="sc-") as directory:
        yield Path(directory)


@pytest.fixture(params=["tcp", "unix"])
async def target(
    request: pytest.FixtureRequest, start_sidecar: StartSidecar, short_tmp: Path
) -> str:
    """The lookup listener of a seeded sidecar, over TCP or a unix socket."""
    _php()
    if request.param == "unix":
        socket_path = short_tmp / "lookup.sock"
        sidecar = await start_sidecar(lookup_listen=f"unix:{socket_path}")
        await _seed(sidecar)
        return f"unix:{socket_path}"
    sidecar = await start_sidecar()
    await _seed(sidecar)
    return sidecar.lookup_url


@pytest.mark.parametrize(
    ("shop_id", "entitled", "status"),
    [(ACTIVE_SHOP, True, "active"), (CANCELLED_SHOP, False, "cancelled")],
)
async def test_php_client_known_shop_reports_entitlement(
    target: str, shop_id: str, entitled: bool, status: str
) -> None:
    result = await run_example(target, shop_id, "--product=mymodule")

    assert result["error"] is None
    assert result["entitled"] is entitled
    assert result["entitlement"]["status"] == status
    assert result["entitlement"]["shop_id"] == shop_id


async def test_php_client_unknown_shop_is_not_entitled(target: str) -> None:
    result = await run_example(target, UNKNOWN_SHOP, "--product=mymodule")

    assert result == {"entitled": False, "entitlement": None, "error": None}


async def test_php_client_default_product_differs_from_module(target: str) -> None:
    # The seeded subscriptions belong to "mymodule", not the default product.
    result = await run_example(target, ACTIVE_SHOP)

    assert result == {"entitled": False, "entitlement": None, "error": None}


def _closed_tcp_target() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(("policy", "entitled"), [("deny", False), ("allow", True)])
@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_php_client_sidecar_down_follows_policy(
    policy: str, entitled: bool, transport: str, short_tmp: Path
) -> None:
    target = (
        _closed_tcp_target()
        if transport == "tcp"
        else f"unix:{short_tmp / 'missing.sock'}"
    )

    result = await run_example(
        target, ACTIVE_SHOP, f"--on-unavailable={policy}", "--product=mymodule"
    )

    assert result["entitled"] is entitled
    assert result["entitlement"] is None
    assert result["error"]


@pytest.mark.parametrize(("policy", "entitled"), [("deny", False), ("allow", True)])
async def test_php_client_gives_up_on_a_sidecar_that_never_answers(
    policy: str, entitled: bool
) -> None:
    # Accepts the connection and never answers; each writer is kept, as one
    # that is collected may close its connection.
    writers: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(
        lambda reader, writer: writers.append(writer), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await run_example(
            f"http://127.0.0.1:{port}",
            ACTIVE_SHOP,
            f"--on-unavailable={policy}",
            timeout_ms=200,
        )

    assert result["entitled"] is entitled
    assert result["entitlement"] is None
    assert "did not answer within 200 ms" in result["error"]


async def test_php_client_default_policy_denies_when_down() -> None:
    result = await run_example(_closed_tcp_target(), ACTIVE_SHOP)

    assert result["entitled"] is False
    assert result["error"]


@pytest.mark.parametrize(("policy", "entitled"), [("deny", False), ("allow", True)])
async def test_php_client_billing_api_unreachable_on_miss_follows_policy(
    policy: str, entitled: bool, start_sidecar: StartSidecar
) -> None:
    _php()
    async with running_fake_billing() as billing:
        billing.always_fail = Failure(503)
        sidecar = await start_sidecar(
            {**billing.settings_env(), "SIDECAR_FETCH_ON_MISS": "true"}
        )

        # Long enough for the sidecar's retries of the API to run out.
        result = await run_example(
            sidecar.lookup_url, UNKNOWN_SHOP, f"--on-unavailable={policy}"
        )

    assert result["entitled"] is entitled
    assert result["entitlement"] is None
    assert "Billing API" in result["error"]
