"""The PrestaShop Billing API: an OAuth2 access token, and subscriptions by shop.

Webhooks leave gaps (Billing gives up after a day of failed retries, a new
sidecar starts empty, a restored backup is behind); the API closes them. The
client asks for one subscription at a time, parses it with the same code as a
webhook body, and retries what may pass (429, 5xx, timeouts) within a bound.

Errors raised here:

    BillingError
     ├── BillingUnavailable    no usable answer: network, timeout, 429/5xx
     │    └── BillingBadResponse   an answer that is not a usable subscription
     └── BillingAuthError      the credentials or the access token were refused

No message, log line or repr carries the client secret or an access token.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from .events import EventError, SubscriptionState, subscription_state
from .settings import PRODUCT_PATTERN, SHOP_ID_PATTERN, Secrets, Settings, SettingsError

# Renew a token this long before it expires (or at half its life, if shorter),
# so that a request never leaves with a token about to lapse.
RENEW_BEFORE_S = 60.0
# When the token endpoint does not say how long a token lasts.
DEFAULT_TOKEN_LIFETIME_S = 300.0
MAX_ATTEMPTS = 3
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 5.0
# Without a lookup's time budget, wait at most this long for a Retry-After.
MAX_RETRY_AFTER_S = 60.0
MAX_RESPONSE_BYTES = 1_048_576

log = logging.getLogger("sidecar.billing")


class BillingError(Exception):
    """The Billing API could not be used for this request."""


class BillingUnavailable(BillingError):
    """The Billing API gave no usable answer in time."""


class BillingBadResponse(BillingUnavailable):
    """The Billing API answered with something that is not a subscription."""


class BillingAuthError(BillingError):
    """The token endpoint refused the credentials, or the API refused the token."""


class _Transient(BillingUnavailable):
    """A failure that may pass: worth another attempt after `retry_after_s`."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class _TokenRejected(Exception):
    pass


@dataclass(frozen=True)
class Credentials:
    """What the client-credentials grant needs."""

    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    audience: str = ""
    scopes: str = ""


def credentials_from_settings(
    settings: Settings, secrets: Secrets
) -> Credentials | None:
    """Return the Billing API credentials, or None when the API is not configured."""
    client_id = settings.billing_client_id.strip()
    client_secret = secrets.billing_client_secret
    if not client_id and not client_secret:
        return None
    if not client_secret:
        raise SettingsError(
            "SIDECAR_BILLING_CLIENT_ID is set but no client secret is: set"
            " SIDECAR_BILLING_CLIENT_SECRET, SIDECAR_BILLING_CLIENT_SECRET_FILE or"
            " the billing-client-secret credential"
        )
    if not client_id:
        raise SettingsError(
            "a Billing client secret is set but SIDECAR_BILLING_CLIENT_ID is not:"
            " set it, or remove the secret"
        )
    return Credentials(
        token_url=settings.oauth_token_url,
        client_id=client_id,
        client_secret=client_secret,
        audience=settings.billing_audience.strip(),
        scopes=" ".join(settings.billing_scopes.replace(",", " ").split()),
    )


def client_from_settings(settings: Settings, secrets: Secrets) -> BillingClient | None:
    """Build the API client, or return None when no credentials are configured.

    Call it from a coroutine: the client's connection pool belongs to the loop.
    """
    credentials = credentials_from_settings(settings, secrets)
    if credentials is None:
        return None
    return BillingClient(
        settings.billing_api_url, credentials, settings.billing_timeout_seconds
    )


@dataclass(frozen=True)
class _AccessToken:
    value: str = field(repr=False)
    renew_at: float


class TokenProvider:
    """Hands out a cached access token; one refresh at a time, shared by all."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        credentials: Credentials,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._credentials = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        self._current: _AccessToken | None = None
        self._refresh: asyncio.Task[_AccessToken] | None = None

    async def token(self) -> str:
        """Return a token that is not about to expire, fetching one if needed."""
        current = self._current
        if current is not None and self._clock() < current.renew_at:
            return current.value
        return await self._refreshed()

    def discard(self, rejected: str) -> None:
        """Forget a token the API refused, unless it was already replaced."""
        if self._current is not None and self._current.value == rejected:
            self._current = None

    def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()

    async def _refreshed(self) -> str:
        if self._refresh is None:
            self._refresh = asyncio.create_task(self._request_token())
            self._refresh.add_done_callback(self._refresh_done)
        # Shielded so that a caller giving up (a lookup out of time) does not
        # cancel the refresh that the other callers are waiting for.
        token = await asyncio.shield(self._refresh)
        return token.value

    def _refresh_done(self, task: asyncio.Task[_AccessToken]) -> None:
        self._refresh = None
        if task.cancelled():
            return
        # Retrieved here too, in case every waiter was cancelled meanwhile.
        if task.exception() is None:
            self._current = task.result()

    async def _request_token(self) -> _AccessToken:
        credentials = self._credentials
        form = {"grant_type": "client_credentials"}
        if credentials.audience:
            form["audience"] = credentials.audience
        if credentials.scopes:
            form["scope"] = credentials.scopes
        # RFC 6749 section 2.3.1: form-encode both parts before Basic encoding.
        pair = (
            quote(credentials.client_id, safe="")
            + ":"
            + quote(credentials.client_secret, safe="")
        )
        headers = {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}

        requested_at = self._clock()
        try:
            async with self._session.post(
                credentials.token_url, data=form, headers=headers, timeout=self._timeout
            ) as response:
                status = response.status
                body = await _read_limited(response)
        except TimeoutError:
            raise _Transient("the token endpoint did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise _Transient(
                f"cannot reach the token endpoint: {_describe(exc)}"
            ) from None

        if status == 429 or status >= 500:
            raise _Transient(f"the token endpoint answered HTTP {status}")
        if status != 200:
            raise BillingAuthError(
                f"the token endpoint refused the client credentials (HTTP {status}"
                f"{_oauth_error(body)}): check SIDECAR_BILLING_CLIENT_ID and the"
                " client secret"
            )
        value, lifetime_s = _parse_token(body)
        renew_before_s = min(RENEW_BEFORE_S, lifetime_s / 2)
        log.info("obtained a Billing API access token valid for %.0f s", lifetime_s)
        return _AccessToken(value, requested_at + lifetime_s - renew_before_s)


def _parse_token(body: bytes) -> tuple[str, float]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise BillingBadResponse(
            "the token endpoint sent a body that is not JSON"
        ) from None
    if not isinstance(document, dict):
        raise BillingBadResponse("the token endpoint sent JSON that is not an object")

    value = document.get("access_token")
    if not isinstance(value, str) or not value:
        raise BillingBadResponse("the token endpoint sent no access_token")
    token_type = document.get("token_type", "bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise BillingBadResponse(f"expected a bearer token, got type {token_type!r}")

    lifetime_s = document.get("expires_in", DEFAULT_TOKEN_LIFETIME_S)
    if isinstance(lifetime_s, str) and lifetime_s.isdigit():
        lifetime_s = int(lifetime_s)
    if (
        not isinstance(lifetime_s, int | float)
        or isinstance(lifetime_s, bool)
        or not math.isfinite(lifetime_s)
        or lifetime_s <= 0
    ):
        raise BillingBadResponse("the token endpoint sent an unusable expires_in")
    return value, float(lifetime_s)


def _oauth_error(body: bytes) -> str:
    """The OAuth `error` code of a refusal, which names the cause and no secret."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    error = document.get("error") if isinstance(document, dict) else None
    if isinstance(error, str) and error.isascii() and error.isidentifier():
        return f", {error[:40]}"
    return ""


@dataclass(frozen=True)
class BillingSubscription:
    """A subscription as the Billing API returned it."""

    shop_id: str
    product: str
    state: SubscriptionState
    body: bytes = field(repr=False)


class BillingClient:
    """Reads subscriptions from the Billing API; create it inside a coroutine."""

    def __init__(
        self,
        api_url: str,
        credentials: Credentials,
        timeout_s: float = 2.0,
        *,
        max_attempts: int = MAX_ATTEMPTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api_url = api_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_attempts = max_attempts
        self._session = aiohttp.ClientSession(
            headers={"Accept": "application/json"}, raise_for_status=False
        )
        self.tokens = TokenProvider(self._session, credentials, timeout_s, clock)

    async def __aenter__(self) -> BillingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool; safe to call twice."""
        self.tokens.close()
        await self._session.close()

    async def fetch_subscription(
        self, shop_id: str, product: str, budget_s: float | None = None
    ) -> BillingSubscription | None:
        """Return the shop's subscription to `product`, or None if the API has none.

        With `budget_s`, every attempt and every wait fits in that many seconds.
        """
        url = self._subscription_url(shop_id, product)
        if budget_s is None:
            return await self._with_retries(url, shop_id, product, None)

        deadline = asyncio.get_running_loop().time() + budget_s
        try:
            async with asyncio.timeout_at(deadline):
                return await self._with_retries(url, shop_id, product, deadline)
        except TimeoutError:
            raise BillingUnavailable(
                f"the Billing API did not answer within {budget_s:g} s"
            ) from None

    def _subscription_url(self, shop_id: str, product: str) -> str:
        if not SHOP_ID_PATTERN.fullmatch(shop_id):
            raise ValueError(f"expected a shop id, got {shop_id!r}")
        if not PRODUCT_PATTERN.fullmatch(product) or product in {".", ".."}:
            raise ValueError(f"expected a product name, got {product!r}")
        return f"{self._api_url}/customers/{shop_id}/subscriptions/{product}"

    async def _with_retries(
        self, url: str, shop_id: str, product: str, deadline: float | None
    ) -> BillingSubscription | None:
        loop = asyncio.get_running_loop()
        attempt = 0
        renewed = False
        while True:
            attempt += 1
            token = await self._token_or_transient(attempt, deadline)
            if token is None:
                continue
            try:
                body = await self._get(url, token)
            except _TokenRejected:
                if renewed:
                    raise BillingAuthError(
                        "the Billing API refused a freshly issued access token"
                        " (HTTP 401): check that the client may read subscriptions"
                        " (SIDECAR_BILLING_AUDIENCE, SIDECAR_BILLING_SCOPES)"
                    ) from None
                # A token can be revoked before it expires: renew it once, and
                # do not count that against the attempts.
                renewed = True
                attempt -= 1
                self.tokens.discard(token)
                continue
            except _Transient as problem:
                await self._pause(problem, attempt, deadline, loop)
                continue

            if body is None:
                return None
            return parse_subscription(body, shop_id, product)

    async def _token_or_transient(
        self, attempt: int, deadline: float | None
    ) -> str | None:
        try:
            return await self.tokens.token()
        except _Transient as problem:
            await self._pause(problem, attempt, deadline, asyncio.get_running_loop())
            return None

    async def _pause(
        self,
        problem: _Transient,
        attempt: int,
        deadline: float | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Wait before the next attempt, or raise if there is none to make."""
        if attempt >= self._max_attempts:
            raise BillingUnavailable(
                f"{problem}; gave up after {attempt} attempts"
            ) from None
        wait_s = problem.retry_after_s
        if wait_s is None:
            backoff_s = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
            wait_s = random.uniform(backoff_s / 2, backoff_s)
        if deadline is not None and loop.time() + wait_s >= deadline:
            raise BillingUnavailable(
                f"{problem}; no time left to wait {wait_s:.1f} s for a retry"
            ) from None
        if wait_s > MAX_RETRY_AFTER_S:
            raise BillingUnavailable(
                f"{problem}; asked to wait {wait_s:.0f} s, more than"
                f" {MAX_RETRY_AFTER_S:.0f} s"
            ) from None
        log.info("Billing API: %s; retrying in %.2f s", problem, wait_s)
        await asyncio.sleep(wait_s)

    async def _get(self, url: str, token: str) -> bytes | None:
        """One request: the body of a 200, None for a 404; raise otherwise."""
        headers = {"Authorization": f"Bearer {token}"}
        try:
            async with self._session.get(
                url, headers=headers, timeout=self._timeout
            ) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After")
                body = await _read_limited(response)
        except TimeoutError:
            raise _Transient("the Billing API did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise _Transient(
                f"cannot reach the Billing API: {_describe(exc)}"
            ) from None

        if status == 200:
            return body
        if status == 404:
            return None
        if status == 401:
            raise _TokenRejected()
        if status == 429 or status >= 500:
            raise _Transient(
                f"the Billing API answered HTTP {status}", _retry_after_s(retry_after)
            )
        if status == 403:
            raise BillingAuthError(
                "the Billing API refused access (HTTP 403): check that the client"
                " may read subscriptions (SIDECAR_BILLING_SCOPES)"
            )
        raise BillingUnavailable(f"the Billing API answered HTTP {status}")


def parse_subscription(body: bytes, shop_id: str, product: str) -> BillingSubscription:
    """Read a bare Chargebee subscription, or one wrapped as {"subscription": ...}."""
    try:
        document: Any = json.loads(body)
    except (ValueError, RecursionError):
        raise BillingBadResponse(
            "the Billing API sent a body that is not JSON"
        ) from None

    where = "response"
    if isinstance(document, dict) and isinstance(document.get("subscription"), dict):
        document, where = document["subscription"], "subscription"
    if not isinstance(document, dict):
        raise BillingBadResponse("the Billing API sent JSON that is not an object")
    try:
        state = subscription_state(document, where)
    except EventError as exc:
        raise BillingBadResponse(
            f"the Billing API sent an unusable subscription: {exc.reason}"
        ) from None
    return BillingSubscription(shop_id, product, state, body)


async def _read_limited(response: aiohttp.ClientResponse) -> bytes:
    if (response.content_length or 0) > MAX_RESPONSE_BYTES:
        raise BillingBadResponse(
            f"the answer is larger than {MAX_RESPONSE_BYTES} bytes"
        )
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(65536):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise BillingBadResponse(
                f"the answer is larger than {MAX_RESPONSE_BYTES} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = moment.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _describe(exc: aiohttp.ClientError) -> str:
    # Connection errors name the host and the OS error; request headers, where
    # the credentials travel, are never part of them.
    return str(exc) or type(exc).__name__
