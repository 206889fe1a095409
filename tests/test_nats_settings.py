"""Multi-host settings: off by default, checked at start-up, secrets kept out."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_cli
from sidecar.settings import SettingsError, load_secrets, load_settings

PASSWORD = "s3cret-nats-pass"
NATS_URL = "nats://n1:4222"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for key in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(key, raising=False)
    for key in [key for key in os.environ if key.startswith("SIDECAR_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    yield


def test_settings_without_nats_url_stay_single_host(clean_env: None) -> None:
    settings = load_settings()

    assert settings.nats_servers == []
    assert (settings.nats_stream, settings.nats_subject, settings.nats_replicas) == (
        "entitlement-deliveries",
        "entitlement.deliveries",
        3,
    )
    assert settings.nats_max_age_days <= settings.retention_days


def test_consumer_name_defaults_to_the_host_name(clean_env: None) -> None:
    expected = "".join(
        char if char.isascii() and (char.isalnum() or char in "_-") else "-"
        for char in socket.gethostname()
    )[:64]

    assert load_settings().nats_consumer == expected


@pytest.mark.parametrize(
    "value",
    [
        "nats://n1:4222,nats://n2:4222,nats://n3:4222",
        "nats://n1:4222 nats://n2:4222\ttls://n3:4222",
        " nats://n1:4222, nats://n2:4222 ,tls://n3:4222 ",
    ],
)
def test_nats_url_with_several_servers_lists_each(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("SIDECAR_NATS_URL", value)

    assert len(load_settings().nats_servers) == 3


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SIDECAR_NATS_URL": "http://n1:4222"}, "nats://host:port"),
        ({"SIDECAR_NATS_URL": "n1:4222"}, "nats://host:port"),
        ({"SIDECAR_NATS_STREAM": "entitlement.deliveries"}, "SIDECAR_NATS_STREAM"),
        ({"SIDECAR_NATS_CONSUMER": "host a"}, "SIDECAR_NATS_CONSUMER"),
        ({"SIDECAR_NATS_SUBJECT": "entitlement.>"}, "SIDECAR_NATS_SUBJECT"),
        ({"SIDECAR_NATS_SUBJECT": "entitlement..x"}, "SIDECAR_NATS_SUBJECT"),
        ({"SIDECAR_NATS_REPLICAS": "7"}, "SIDECAR_NATS_REPLICAS"),
        ({"SIDECAR_NATS_PUBLISH_TIMEOUT_SECONDS": "0"}, "PUBLISH_TIMEOUT"),
        (
            {"SIDECAR_NATS_URL": NATS_URL, "SIDECAR_NATS_MAX_AGE_DAYS": "31"},
            "longer than SIDECAR_RETENTION_DAYS (30)",
        ),
        (
            {
                "SIDECAR_NATS_URL": NATS_URL,
                "SIDECAR_RETENTION_DAYS": "5",
                "SIDECAR_NATS_MAX_AGE_DAYS": "7",
            },
            "SIDECAR_NATS_MAX_AGE_DAYS",
        ),
    ],
)
def test_bad_nats_setting_is_refused_naming_it(
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    named: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    with pytest.raises(SettingsError) as refused:
        load_settings()

    assert named in str(refused.value)


def test_short_retention_without_nats_needs_no_stream_setting(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDECAR_RETENTION_DAYS", "2")

    assert load_settings().retention_days == 2


def test_nats_url_with_a_password_is_refused_without_printing_it(
    clean_env: None, tmp_path: Path
) -> None:
    url = f"nats://sidecar:{PASSWORD}@n1:4222"
    env = {"SIDECAR_NATS_URL": url, "SIDECAR_DB": str(tmp_path / "s.db")}

    result = run_cli("serve", env=env, timeout=15)

    assert result.returncode == 2
    assert "SIDECAR_NATS_PASSWORD" in result.stderr
    assert PASSWORD not in result.stderr


@pytest.mark.parametrize("source", ["env", "file", "credential"])
@pytest.mark.parametrize(
    ("secret", "credential"), [("password", "nats-password"), ("token", "nats-token")]
)
def test_nats_secret_is_read_from_each_source_and_kept_out_of_repr(
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    source: str,
    secret: str,
    credential: str,
) -> None:
    variable = f"SIDECAR_NATS_{secret.upper()}"
    if source == "env":
        monkeypatch.setenv(variable, PASSWORD)
    elif source == "file":
        (tmp_path / "secret").write_text(PASSWORD + "\n")
        monkeypatch.setenv(variable + "_FILE", str(tmp_path / "secret"))
    else:
        (tmp_path / credential).write_text(PASSWORD + "\n")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))

    settings = load_settings()
    secrets = load_secrets(settings)

    assert getattr(secrets, f"nats_{secret}") == PASSWORD
    assert PASSWORD not in repr(settings) + repr(secrets)
