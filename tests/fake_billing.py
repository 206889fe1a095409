"""A Billing API and its OAuth2 token endpoint, served on a loopback port.

Tests set what it serves (`subscriptions`) and how it misbehaves (slow answers,
5xx, 429 with Retry-After, revoked tokens), then count what it was asked.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from sidecar.billing import BillingClient, Credentials

CLIENT_ID = "sidecar-tests"
CLIENT_SECRET = "s3cret-client-value-5d0c1e"


def subscription(
    status: str,
    resource_version: int,
    plan: str = "mymodule-pro",
    product: str = "mymodule",
    **fields: Any,
) -> dict[str, Any]:
    """A Chargebee subscription as the Billing API returns it."""
    return {
        "id": f"sub-{resource_version}",
        "plan_id": plan,
        "status": status,
        "updated_at": resource_version // 1000,
        "resource_version": resource_version,
        "meta_data": {"module": product},
        **fields,
    }


@dataclass
class Failure:
    status: int
    retry_after: str | None = None


@dataclass
class FakeBilling:
    """Serves `subscriptions[(shop, product)]` as is: bare, wrapped, or anything."""

    subscriptions: dict[tuple[str, str], Any] = field(default_factory=dict)
    token_lifetime_s: int = 3600
    token_delay_s: float = 0.0
    api_delay_s: float = 0.0
    # Answered, in order, to the next API requests; then `always_fail`, if set.
    failures: list[Failure] = field(default_factory=list)
    always_fail: Failure | None = None
    # Refuse every bearer token, even one just issued.
    reject_all_tokens: bool = False
    token_requests: int = 0
    token_forms: list[dict[str, str]] = field(default_factory=list)
    api_requests: int = 0
    api_paths: list[str] = field(default_factory=list)
    issued_tokens: list[str] = field(default_factory=list)
    _valid_tokens: set[str] = field(default_factory=set)
    # Set on close, so that slow answers in progress end at once.
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    base_url: str = ""

    @property
    def token_url(self) -> str:
        return self.base_url + "/oauth2/token"

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def settings_env(self) -> dict[str, str]:
        """The SIDECAR_* variables that point a sidecar at this fake."""
        return {
            "SIDECAR_BILLING_API_URL": self.api_url,
            "SIDECAR_OAUTH_TOKEN_URL": self.token_url,
            "SIDECAR_BILLING_CLIENT_ID": CLIENT_ID,
            "SIDECAR_BILLING_CLIENT_SECRET": CLIENT_SECRET,
        }

    def credentials(self, secret: str = CLIENT_SECRET, **extra: str) -> Credentials:
        return Credentials(self.token_url, CLIENT_ID, secret, **extra)

    def client(self, timeout_s: float = 2.0, **options: Any) -> BillingClient:
        """A client of this fake; call from a coroutine, and close it."""
        credentials = options.pop("credentials", None) or self.credentials()
        return BillingClient(self.api_url, credentials, timeout_s, **options)

    def revoke_tokens(self) -> None:
        """Make every token issued so far invalid, as if revoked or expired."""
        self._valid_tokens.clear()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/oauth2/token", self._token)
        app.router.add_get(
            "/v1/customers/{shop}/subscriptions/{product}", self._subscription
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = {key: str(value) for key, value in (await request.post()).items()}
        self.token_forms.append(form)
        await self._stall(self.token_delay_s)

        if not self._client_authenticated(request.headers.get("Authorization", "")):
            return _json({"error": "invalid_client"}, 401)
        if form.get("grant_type") != "client_credentials":
            return _json({"error": "unsupported_grant_type"}, 400)

        token = secrets.token_urlsafe(24)
        self.issued_tokens.append(token)
        self._valid_tokens.add(token)
        return _json(
            {
                "access_token": token,
                "token_type": "bearer",
                "expires_in": self.token_lifetime_s,
            }
        )

    async def _stall(self, delay_s: float) -> None:
        if delay_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay_s)

    def _client_authenticated(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        client_id, _, secret = base64.b64decode(encoded).decode().partition(":")
        return (unquote(client_id), unquote(secret)) == (CLIENT_ID, CLIENT_SECRET)

    async def _subscription(self, request: web.Request) -> web.Response:
        self.api_requests += 1
        self.api_paths.append(request.path)
        await self._stall(self.api_delay_s)

        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or token not in self._valid_tokens:
            return _json({"error": "invalid_token"}, 401)
        if self.reject_all_tokens:
            return _json({"error": "invalid_token"}, 401)

        failure = self.failures.pop(0) if self.failures else self.always_fail
        if failure is not None:
            headers = (
                {"Retry-After": failure.retry_after} if failure.retry_after else {}
            )
            return _json({"error": "unavailable"}, failure.status, headers)

        key = (request.match_info["shop"], request.match_info["product"])
        if key not in self.subscriptions:
            return _json({"error": "not_found"}, 404)
        body = self.subscriptions[key]
        if isinstance(body, bytes):
            return web.Response(body=body, content_type="application/json")
        return _json(body)


def _json(
    payload: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=json.dumps(payload),
        status=status,
        content_type="application/json",
        headers=headers,
    )


@asynccontextmanager
async def running_fake_billing() -> AsyncIterator[FakeBilling]:
    fake = FakeBilling()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()
