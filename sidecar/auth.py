"""Authenticate a webhook request: Standard Webhooks (Svix) signatures or Basic.

A request passes when any configured method accepts it. Signatures are checked
on the raw body bytes, before anything parses them; the `standardwebhooks`
library computes them, and every comparison is constant-time.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook

from .settings import Secrets

SIGNATURE_HEADERS = ("id", "timestamp", "signature")
# How far a signed timestamp may be from the local clock, either way.
TOLERANCE_S = 300
_NO_MATCH = "no signature matches a configured secret"
_MISSING = "webhook-id, webhook-timestamp and webhook-signature are all required"
_BAD_TIMESTAMP = "webhook-timestamp must be UNIX seconds"
_NOT_ASCII = "webhook-id and webhook-signature must be ASCII"
_OUT_OF_WINDOW = "webhook-timestamp is more than 5 minutes from the server clock"


# Built for every delivery: not frozen, for the reason given in events.py.
@dataclass(slots=True)
class AuthResult:
    """The outcome of authentication; `signed_timestamp` is set only by a signature."""

    ok: bool
    method: str  # 'signature', 'basic' or 'none'
    reason: str = ""
    signed_timestamp: int | None = None


class Authenticator:
    """Checks requests against the secrets loaded at start-up."""

    def __init__(self, secrets: Secrets) -> None:
        self._verifiers = [Webhook(key) for key in secrets.signing_keys]
        self._basic_tokens = secrets.basic_tokens

    @property
    def required(self) -> bool:
        return bool(self._verifiers or self._basic_tokens)

    def check(self, headers: Mapping[str, str], body: bytes) -> AuthResult:
        """Accept the request if any configured method does."""
        if not self.required:
            return AuthResult(ok=True, method="none")

        signature_headers = signature_headers_of(headers)
        authorization = headers.get("Authorization")
        failures: list[AuthResult] = []

        if self._verifiers and signature_headers is not None:
            result = self._check_signature(signature_headers, body)
            if result.ok:
                return result
            failures.append(result)

        if self._basic_tokens and authorization is not None:
            result = self._check_basic(authorization)
            if result.ok:
                return result
            failures.append(result)

        if failures:
            return failures[0]
        return AuthResult(ok=False, method="none", reason=self._what_is_expected())

    def _check_signature(self, sig_headers: dict[str, str], body: bytes) -> AuthResult:
        delivery_id = sig_headers["webhook-id"]
        timestamp = sig_headers["webhook-timestamp"]
        signatures = sig_headers["webhook-signature"]
        if not (delivery_id and timestamp and signatures):
            return AuthResult(ok=False, method="signature", reason=_MISSING)
        # The library signs a timestamp's whole seconds, so "1700000000.9"
        # would verify against a signature over "1700000000": only plain
        # digits are the text that was signed.
        if not (timestamp.isascii() and timestamp.isdigit()):
            return AuthResult(ok=False, method="signature", reason=_BAD_TIMESTAMP)
        # What was signed is ASCII; aiohttp hands other bytes over as lone
        # surrogates, which cannot even be encoded.
        if not (delivery_id.isascii() and signatures.isascii()):
            return AuthResult(ok=False, method="signature", reason=_NOT_ASCII)
        # The length check keeps int() away from a header of thousands of digits.
        signed_at = int(timestamp) if len(timestamp) <= 20 else None
        if signed_at is None or abs(time.time() - signed_at) > TOLERANCE_S:
            return AuthResult(ok=False, method="signature", reason=_OUT_OF_WINDOW)

        # The library computes what each secret signs. The window above and the
        # comparison below are what its verify() does, without its copy of the
        # headers and its date arithmetic, which cost more than the HMAC.
        when = datetime.fromtimestamp(signed_at, UTC)
        presented = signatures.split(" ")
        for verifier in self._verifiers:
            expected = verifier.sign(delivery_id, when, body)
            matched = False
            # Every entry is compared, so the time taken does not tell which
            # one matched.
            for entry in presented:
                matched |= hmac.compare_digest(expected, entry)
            if matched:
                return AuthResult(
                    ok=True, method="signature", signed_timestamp=signed_at
                )
        return AuthResult(ok=False, method="signature", reason=_NO_MATCH)

    def _check_basic(self, authorization: str) -> AuthResult:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "basic" or not token.strip():
            return AuthResult(
                ok=False, method="basic", reason="Authorization must be Basic <token>"
            )
        presented = token.strip().encode("utf-8", "surrogateescape")
        matched = False
        # Compare against every token so the time taken does not tell which one
        # was close.
        for accepted in self._basic_tokens:
            matched |= hmac.compare_digest(presented, accepted)
        if matched:
            return AuthResult(ok=True, method="basic")
        return AuthResult(ok=False, method="basic", reason="basic credentials rejected")

    def _what_is_expected(self) -> str:
        wanted = []
        if self._verifiers:
            wanted.append("webhook-id, webhook-timestamp and webhook-signature headers")
        if self._basic_tokens:
            wanted.append("an Authorization: Basic header")
        return "missing authentication: expected " + " or ".join(wanted)


def signature_headers_of(headers: Mapping[str, str]) -> dict[str, str] | None:
    """Return the three signature headers under `webhook-` names, or None.

    Svix sends the same headers with an `svix-` prefix; either set is accepted.
    """
    for prefix in ("webhook-", "svix-"):
        values = {name: headers.get(prefix + name) for name in SIGNATURE_HEADERS}
        if any(value is not None for value in values.values()):
            return {"webhook-" + name: value or "" for name, value in values.items()}
    return None


def delivery_id_header(headers: Mapping[str, str]) -> str | None:
    """Return the sender's delivery id; an empty header is returned, to be refused."""
    for name in ("webhook-id", "svix-id"):
        value = headers.get(name)
        if value is not None:
            return value
    return None
