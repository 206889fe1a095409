"""Settings: built-in defaults < TOML file < SIDECAR_* environment < command line.

Every setting is declared once in `Settings`, with its default and its unit in
its name. Secrets are read by `load_settings` from the environment, a file, or a
systemd credential, and are never part of an error message.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

SHOP_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
PRODUCT_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# JetStream stream and consumer names: no dots, wildcards or spaces.
NATS_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
NATS_SUBJECT_PATTERN = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


class SettingsError(Exception):
    """A setting has a value the sidecar cannot run with."""


@dataclass(frozen=True)
class Listen:
    """Where a listener binds: a TCP host and port, or a unix socket path."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    @property
    def is_loopback(self) -> bool:
        if self.is_unix:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.is_unix:
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_listen(value: str) -> Listen:
    """Parse `host:port`, `[v6]:port` or `unix:/path`."""
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError("a unix socket needs an absolute path, as in unix:/run/x")
        return Listen(path=path)
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError("expected host:port, [ipv6]:port or unix:/path")
    port = int(port_text)
    if port > 65535:
        raise ValueError("the port must be between 0 and 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Listen(host=host, port=port)


def default_db_path() -> str:
    """Put the database in systemd's state directory when there is one."""
    state_dirs = os.environ.get("STATE_DIRECTORY", "")
    if state_dirs:
        return str(Path(state_dirs.split(":")[0]) / "sidecar.db")
    return "sidecar.db"


def default_consumer_name() -> str:
    """Name this host's stream consumer after the host, as JetStream allows."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64]
    return name or "sidecar"


def split_nats_servers(value: str) -> list[str]:
    """Split SIDECAR_NATS_URL into its server URLs."""
    return [part for part in re.split(r"[\s,]+", value) if part]


class Settings(BaseSettings):
    """Every setting of the sidecar, with its default."""

    model_config = SettingsConfigDict(
        env_prefix="SIDECAR_", extra="forbid", validate_default=True
    )

    # An empty path would make SQLite use a private temporary database.
    db: str = Field(default_factory=default_db_path, min_length=1)
    webhook_listen: str = "127.0.0.1:7480"
    lookup_listen: str = "127.0.0.1:7481"
    lookup_allow_remote: bool = False
    product: str = "default"
    grace_seconds: int = Field(default=3600, ge=0)
    retention_days: int = Field(default=30, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    busy_timeout_ms: int = Field(default=5000, ge=0)
    shutdown_timeout_seconds: float = Field(default=10.0, gt=0)
    read_timeout_seconds: float = Field(default=15.0, gt=0)
    max_webhook_connections: int = Field(default=64, ge=1)
    log_format: str = Field(default="plain", pattern=r"^(plain|json)$")
    log_level: str = Field(
        default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR|debug|info|warning|error)$"
    )
    log_lookups: bool = False

    # The Billing API fills gaps that webhooks leave; off without credentials.
    billing_api_url: str = "https://api.billing.prestashop.com/v1"
    oauth_token_url: str = "https://oauth.prestashop.com/oauth2/token"
    billing_client_id: str = ""
    billing_client_secret: str = Field(default="", repr=False)
    billing_client_secret_file: str = ""
    billing_audience: str = ""
    billing_scopes: str = ""
    billing_timeout_seconds: float = Field(default=2.0, gt=0)
    fetch_on_miss: bool = False

    # Several hosts share one stream of deliveries on NATS JetStream; off when
    # no server is set (see sidecar/cluster.py).
    nats_url: str = ""
    nats_stream: str = "entitlement-deliveries"
    nats_subject: str = "entitlement.deliveries"
    nats_consumer: str = Field(default_factory=default_consumer_name)
    nats_replicas: int = Field(default=3, ge=1, le=5)
    nats_max_age_days: int = Field(default=7, ge=1)
    nats_duplicate_window_seconds: int = Field(default=120, ge=1, le=86400)
    nats_publish_timeout_seconds: float = Field(default=5.0, gt=0)
    nats_apply_wait_seconds: float = Field(default=2.0, ge=0)
    nats_user: str = ""
    nats_password: str = Field(default="", repr=False)
    nats_password_file: str = ""
    nats_token: str = Field(default="", repr=False)
    nats_token_file: str = ""

    webhook_secret: str = Field(default="", repr=False)
    webhook_secret_file: str = ""
    basic_auth: str = Field(default="", repr=False)
    basic_auth_file: str = ""

    @field_validator("webhook_listen", "lookup_listen")
    @classmethod
    def _valid_listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("billing_api_url", "oauth_token_url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL")
        return value

    @field_validator("product")
    @classmethod
    def _valid_product(cls, value: str) -> str:
        if not PRODUCT_PATTERN.fullmatch(value):
            raise ValueError("expected 1 to 64 characters of A-Z a-z 0-9 _ . -")
        return value

    @field_validator("nats_url")
    @classmethod
    def _valid_nats_url(cls, value: str) -> str:
        # Errors never repeat the value: a URL may carry a password.
        for url in split_nats_servers(value):
            scheme, sep, rest = url.partition("://")
            if not sep or scheme not in ("nats", "tls") or not rest:
                raise ValueError("expected nats://host:port or tls://host:port URLs")
            if "@" in rest:
                raise ValueError(
                    "put NATS credentials in SIDECAR_NATS_PASSWORD or"
                    " SIDECAR_NATS_TOKEN, not in the URL"
                )
        return value

    @field_validator("nats_stream", "nats_consumer")
    @classmethod
    def _valid_nats_name(cls, value: str) -> str:
        if not NATS_NAME_PATTERN.fullmatch(value):
            raise ValueError("expected 1 to 64 characters of A-Z a-z 0-9 _ -")
        return value

    @field_validator("nats_subject")
    @classmethod
    def _valid_nats_subject(cls, value: str) -> str:
        if not NATS_SUBJECT_PATTERN.fullmatch(value) or len(value) > 200:
            raise ValueError("expected dot-separated words of A-Z a-z 0-9 _ -")
        return value

    @field_validator("nats_max_age_days")
    @classmethod
    def _stream_keeps_no_body_past_retention(
        cls, value: int, info: ValidationInfo
    ) -> int:
        # The stream holds delivery bodies, which carry personal data. Without
        # a NATS server there is no stream, and nothing to check.
        retention_days = info.data.get("retention_days")
        if not info.data.get("nats_url"):
            return value
        if retention_days is not None and value > retention_days:
            raise ValueError(
                f"the stream would keep bodies longer than SIDECAR_RETENTION_DAYS"
                f" ({retention_days})"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file is passed in as the lowest-priority init values (see
        # load_settings), so only flags and the environment are layered here.
        return (init_settings, env_settings)

    @property
    def webhook_bind(self) -> Listen:
        return parse_listen(self.webhook_listen)

    @property
    def lookup_bind(self) -> Listen:
        return parse_listen(self.lookup_listen)

    @property
    def nats_servers(self) -> list[str]:
        return split_nats_servers(self.nats_url)


@dataclass(frozen=True)
class Secrets:
    """The accepted credentials, decoded once at start-up."""

    signing_keys: tuple[str, ...] = ()
    basic_tokens: tuple[bytes, ...] = ()
    billing_client_secret: str = field(default="", repr=False)
    nats_password: str = field(default="", repr=False)
    nats_token: str = field(default="", repr=False)

    @property
    def any(self) -> bool:
        return bool(self.signing_keys or self.basic_tokens)


_FLAG_NAMES = {
    "db": "--db",
    "webhook_listen": "--webhook-listen",
    "lookup_listen": "--lookup-listen",
    "product": "--product",
}
_SECRET_FIELDS = {
    "webhook_secret",
    "basic_auth",
    "billing_client_secret",
    "nats_url",
    "nats_password",
    "nats_token",
}


def setting_name(field: str) -> str:
    """Name a setting the way an operator sets it."""
    name = f"SIDECAR_{field.upper()}"
    flag = _FLAG_NAMES.get(field)
    return f"{name} ({flag})" if flag else name


def load_settings(
    config_file: str | None = None, flags: dict[str, Any] | None = None
) -> Settings:
    """Layer the TOML file, the environment and the flags; raise SettingsError."""
    flags = {key: value for key, value in (flags or {}).items() if value is not None}
    config_file = config_file or os.environ.get("SIDECAR_CONFIG") or None
    file_values: dict[str, Any] = {}
    if config_file:
        file_values = _read_toml(config_file)

    # Environment beats the file, and flags beat both: pydantic-settings gives
    # init values priority over the environment, so the file's values are only
    # passed for fields that the environment does not set.
    from_env = {
        key for key in Settings.model_fields if f"SIDECAR_{key.upper()}" in os.environ
    }
    init = {k: v for k, v in file_values.items() if k not in from_env}
    init.update(flags)

    try:
        return Settings(**init)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, config_file)) from None


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise SettingsError(
            f"SIDECAR_CONFIG (--config): cannot read {path!r}: {exc.strerror}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(
            f"SIDECAR_CONFIG (--config): {path!r} is not TOML: {exc}"
        ) from None


def _describe(exc: ValidationError, config_file: str | None) -> str:
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else "?"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        return (
            f"SIDECAR_CONFIG (--config): {field!r} in {config_file!r} is not a"
            " setting; check its spelling"
        )
    if field in _SECRET_FIELDS:
        return f"{setting_name(field)}: {message}"
    return f"{setting_name(field)}: {message}, got {error.get('input')!r}"


def load_secrets(settings: Settings) -> Secrets:
    """Collect the signing secrets and basic-auth tokens from their first source."""
    raw_secret = _first_secret(
        settings.webhook_secret, settings.webhook_secret_file, "webhook-secret"
    )
    raw_basic = _first_secret(
        settings.basic_auth, settings.basic_auth_file, "basic-auth"
    )
    keys = tuple(part for part in re.split(r"[\s,]+", raw_secret) if part)
    for key in keys:
        _check_signing_key(key)
    tokens = tuple(_basic_token(part) for part in re.split(r"\s+", raw_basic) if part)
    billing_secret = _first_secret(
        settings.billing_client_secret,
        settings.billing_client_secret_file,
        "billing-client-secret",
    )
    return Secrets(
        signing_keys=keys,
        basic_tokens=tokens,
        billing_client_secret=billing_secret,
        nats_password=_first_secret(
            settings.nats_password, settings.nats_password_file, "nats-password"
        ),
        nats_token=_first_secret(
            settings.nats_token, settings.nats_token_file, "nats-token"
        ),
    )


def _first_secret(value: str, file_path: str, credential: str) -> str:
    # Blank, like an empty credential file, means "not set here".
    if value.strip():
        return value
    if file_path:
        return _read_secret_file(
            file_path, "SIDECAR_" + credential.upper().replace("-", "_") + "_FILE"
        )
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / credential).is_file():
        return _read_secret_file(str(Path(cred_dir) / credential), credential)
    return ""


def _read_secret_file(path: str, name: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise SettingsError(f"{name}: cannot read {path!r}: {reason}") from None


def _check_signing_key(key: str) -> None:
    body = key.removeprefix("whsec_")
    try:
        decoded = base64.b64decode(body + "==", validate=False)
    except (binascii.Error, ValueError):
        decoded = b""
    if not key.startswith("whsec_") or not decoded:
        raise SettingsError(
            "SIDECAR_WEBHOOK_SECRET: each secret must be whsec_ followed by base64"
        )


def _basic_token(token: str) -> bytes:
    """Store every accepted token in the base64 form the header carries."""
    if ":" in token:
        return base64.b64encode(token.encode("utf-8"))
    try:
        base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        raise SettingsError(
            "SIDECAR_BASIC_AUTH: each token must be user:password or its base64"
        ) from None
    return token.encode("ascii")


def check_bind_safety(settings: Settings, secrets: Secrets) -> list[str]:
    """Refuse unsafe binds; return the warnings to log at start-up."""
    warnings = []
    if not secrets.any:
        if not settings.webhook_bind.is_loopback:
            raise SettingsError(
                f"SIDECAR_WEBHOOK_LISTEN={settings.webhook_listen!r} is not loopback,"
                " and no SIDECAR_WEBHOOK_SECRET or SIDECAR_BASIC_AUTH is set:"
                " configure one, or bind to 127.0.0.1"
            )
        warnings.append(
            "no SIDECAR_WEBHOOK_SECRET or SIDECAR_BASIC_AUTH is set: accepting"
            " unauthenticated webhooks on the loopback listener"
            f" {settings.webhook_listen}"
        )
    if not settings.lookup_bind.is_loopback and not settings.lookup_allow_remote:
        raise SettingsError(
            f"SIDECAR_LOOKUP_LISTEN={settings.lookup_listen!r} is not loopback or a"
            " unix socket; set SIDECAR_LOOKUP_ALLOW_REMOTE=true to allow it"
        )
    return warnings
