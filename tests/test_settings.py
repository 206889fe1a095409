"""Settings: defaults, their layering, secret sources, refusals and safe binds."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import (
    BASIC_TOKEN,
    OTHER_SECRET,
    SECRET,
    Process,
    Running,
    StartSidecar,
    basic_headers,
    run_cli,
    signed_headers,
)
from sidecar.settings import (
    SettingsError,
    check_bind_safety,
    load_secrets,
    load_settings,
)
from sidecar.storage import open_database

# Refused settings stop the process at once; a bad setting that is wrongly
# accepted would start the server, so do not wait a whole minute for it.
REFUSAL_TIMEOUT_S = 15
IGNORED_EVENT = {"eventType": "ping", "data": {}}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No SIDECAR_* or systemd variables, and a fresh working directory."""
    for key in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(key, raising=False)
    for key in [key for key in os.environ if key.startswith("SIDECAR_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    yield


@pytest.mark.parametrize(
    ("field", "default"),
    [
        ("db", "sidecar.db"),
        ("webhook_listen", "127.0.0.1:7480"),
        ("lookup_listen", "127.0.0.1:7481"),
        ("lookup_allow_remote", False),
        ("product", "default"),
        ("grace_seconds", 3600),
        ("retention_days", 30),
        ("max_body_bytes", 1_048_576),
    ],
)
def test_settings_without_configuration_use_documented_default(
    clean_env: None, field: str, default: object
) -> None:
    assert getattr(load_settings(), field) == default


def test_secrets_without_configuration_are_empty(clean_env: None) -> None:
    secrets = load_secrets(load_settings())

    assert (secrets.signing_keys, secrets.basic_tokens, secrets.any) == ((), (), False)


@pytest.mark.parametrize(
    ("state_directory", "env_db", "db"),
    [
        ("/var/lib/sidecar", None, "/var/lib/sidecar/sidecar.db"),
        ("/var/lib/first:/var/lib/second", None, "/var/lib/first/sidecar.db"),
        ("/var/lib/sidecar", "/srv/chosen.db", "/srv/chosen.db"),
    ],
    ids=["one-directory", "first-of-several", "explicit-db-wins"],
)
def test_settings_under_systemd_put_database_in_state_directory(
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    state_directory: str,
    env_db: str | None,
    db: str,
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", state_directory)
    if env_db is not None:
        monkeypatch.setenv("SIDECAR_DB", env_db)

    assert load_settings().db == db


def test_cli_under_systemd_opens_database_in_state_directory(tmp_path: Path) -> None:
    missing = run_cli("events", env={"STATE_DIRECTORY": str(tmp_path)})
    open_database(str(tmp_path / "sidecar.db")).close()
    present = run_cli("events", env={"STATE_DIRECTORY": str(tmp_path)})

    assert missing.returncode == 2
    assert str(tmp_path / "sidecar.db") in missing.stderr
    assert (present.returncode, present.stderr) == (0, "")


PRIORITY = [
    # TOML file, environment, flags, the settings that win.
    pytest.param(
        {"product": "file", "grace_seconds": 10},
        {},
        {},
        {"product": "file", "grace_seconds": 10},
        id="file-beats-default",
    ),
    pytest.param(
        {"product": "file", "grace_seconds": 10},
        {"SIDECAR_PRODUCT": "env", "SIDECAR_GRACE_SECONDS": "20"},
        {},
        {"product": "env", "grace_seconds": 20},
        id="env-beats-file",
    ),
    pytest.param(
        {"product": "file", "lookup_listen": "127.0.0.1:1"},
        {"SIDECAR_PRODUCT": "env", "SIDECAR_LOOKUP_LISTEN": "127.0.0.1:2"},
        {"product": "flag", "lookup_listen": "127.0.0.1:3"},
        {"product": "flag", "lookup_listen": "127.0.0.1:3"},
        id="flag-beats-env-and-file",
    ),
    pytest.param(
        {"db": "/file.db", "grace_seconds": 10},
        {"SIDECAR_PRODUCT": "env"},
        {"db": "/flag.db"},
        {"db": "/flag.db", "product": "env", "grace_seconds": 10},
        id="layers-mix-per-setting",
    ),
    pytest.param(
        {"webhook_secret": SECRET},
        {"SIDECAR_WEBHOOK_LISTEN": "127.0.0.1:9"},
        {},
        {"webhook_secret": SECRET, "webhook_listen": "127.0.0.1:9"},
        id="secret-from-file",
    ),
]


@pytest.mark.parametrize(("file_values", "env", "flags", "expected"), PRIORITY)
def test_settings_from_several_layers_take_highest_priority(
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    file_values: dict[str, Any],
    env: dict[str, str],
    flags: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    config = _write_toml(tmp_path / "sidecar.toml", file_values)
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    settings = load_settings(str(config), flags)

    assert {key: getattr(settings, key) for key in expected} == expected


@pytest.mark.parametrize(
    ("use_flag", "product"), [(False, "from-env-file"), (True, "from-flag-file")]
)
def test_settings_config_flag_beats_sidecar_config(
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    use_flag: bool,
    product: str,
) -> None:
    env_file = _write_toml(tmp_path / "env.toml", {"product": "from-env-file"})
    flag_file = _write_toml(tmp_path / "flag.toml", {"product": "from-flag-file"})
    monkeypatch.setenv("SIDECAR_CONFIG", str(env_file))

    settings = load_settings(str(flag_file) if use_flag else None)

    assert settings.product == product


@pytest.mark.parametrize(
    ("config_in", "env", "args", "product"),
    [
        ("env", {}, [], "file"),
        ("flag", {"SIDECAR_PRODUCT": "env"}, [], "env"),
        ("env", {"SIDECAR_PRODUCT": "env"}, ["--product", "flag"], "flag"),
    ],
    ids=["sidecar-config", "env-beats-config-flag", "flag-beats-all"],
)
def test_cli_settings_layers_choose_the_product_looked_up(
    tmp_path: Path, config_in: str, env: dict[str, str], args: list[str], product: str
) -> None:
    db = _database_with_products(tmp_path / "sidecar.db", ["file", "env", "flag"])
    config = _write_toml(tmp_path / "sidecar.toml", {"product": "file", "db": str(db)})
    if config_in == "flag":
        args = [*args, "--config", str(config)]
    else:
        env = {**env, "SIDECAR_CONFIG": str(config)}

    result = run_cli("lookup", "shop-1", *args, env=env)

    assert result.returncode == 0, result.stderr
    assert f'"product":"{product}"' in result.stdout


def _database_with_products(path: Path, products: list[str]) -> Path:
    conn = open_database(str(path))
    for product in products:
        conn.execute(
            "INSERT INTO entitlements (shop_id, product, plan, status, version,"
            " delivery_id) VALUES ('shop-1', ?, 'plan', 'active', 1, 'd')",
            (product,),
        )
    conn.close()
    return path


def _write_toml(path: Path, values: dict[str, Any]) -> Path:
    lines = []
    for key, value in values.items():
        rendered = str(value) if isinstance(value, int) else f'"{value}"'
        lines.append(f"{key} = {rendered}")
    path.write_text("\n".join(lines) + "\n")
    return path


SECRET_SOURCES = [
    # environment, files under tmp_path, auth that passes, auth that fails
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": f"{OTHER_SECRET} {SECRET}"},
        {},
        ["signed", "signed-other"],
        ["unsigned", "basic"],
        id="env-space-separated",
    ),
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": f"{OTHER_SECRET},{SECRET}"},
        {},
        ["signed", "signed-other"],
        ["unsigned"],
        id="env-comma-separated",
    ),
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": f" {OTHER_SECRET} ,\n {SECRET}, "},
        {},
        ["signed", "signed-other"],
        ["unsigned"],
        id="env-mixed-separators",
    ),
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": "", "SIDECAR_WEBHOOK_SECRET_FILE": "{dir}/secret"},
        {"secret": f"{SECRET}\n"},
        ["signed"],
        ["signed-other", "unsigned"],
        id="secret-file",
    ),
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": "", "CREDENTIALS_DIRECTORY": "{dir}"},
        {"webhook-secret": f"{SECRET}\n"},
        ["signed"],
        ["signed-other", "unsigned"],
        id="credential-webhook-secret",
    ),
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": "", "CREDENTIALS_DIRECTORY": "{dir}"},
        {"basic-auth": f"{BASIC_TOKEN}\n"},
        ["basic"],
        ["signed", "unsigned", "basic-wrong"],
        id="credential-basic-auth",
    ),
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": "", "CREDENTIALS_DIRECTORY": "{dir}"},
        {"webhook-secret": " \n\t\n", "basic-auth": "\n"},
        ["unsigned", "signed", "basic"],
        [],
        id="blank-credentials-mean-unset",
    ),
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": " ", "CREDENTIALS_DIRECTORY": "{dir}"},
        {"webhook-secret": SECRET},
        ["signed"],
        ["unsigned"],
        id="blank-env-falls-back-to-credential",
    ),
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": OTHER_SECRET, "CREDENTIALS_DIRECTORY": "{dir}"},
        {"webhook-secret": SECRET},
        ["signed-other"],
        ["signed"],
        id="env-beats-credential",
    ),
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": "", "SIDECAR_BASIC_AUTH": f"x:y  {BASIC_TOKEN}"},
        {},
        ["basic"],
        ["signed", "unsigned", "basic-wrong"],
        id="basic-auth-user-password",
    ),
    pytest.param(
        {
            "SIDECAR_WEBHOOK_SECRET": "",
            "SIDECAR_BASIC_AUTH": base64.b64encode(BASIC_TOKEN.encode()).decode(),
        },
        {},
        ["basic"],
        ["unsigned", "basic-wrong"],
        id="basic-auth-base64",
    ),
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": "", "SIDECAR_BASIC_AUTH_FILE": "{dir}/basic"},
        {"basic": f"{BASIC_TOKEN}\n"},
        ["basic"],
        ["unsigned", "basic-wrong"],
        id="basic-auth-file",
    ),
    pytest.param(
        {"SIDECAR_BASIC_AUTH": BASIC_TOKEN},
        {},
        ["signed", "basic"],
        ["unsigned", "signed-other", "basic-wrong"],
        id="signature-and-basic",
    ),
]


def _auth_headers(kind: str, raw: bytes) -> dict[str, str]:
    if kind == "signed":
        return signed_headers(raw, SECRET)
    if kind == "signed-other":
        return signed_headers(raw, OTHER_SECRET)
    if kind == "basic":
        return basic_headers()
    if kind == "basic-wrong":
        return basic_headers("billing:wrong")
    return {}


async def _post_as(running: Running, kind: str) -> int:
    raw = f'{{"eventType": "ping", "data": {{"as": "{kind}"}}}}'.encode()
    status, _ = await running.post(raw, _auth_headers(kind, raw), sign=False)
    return status


@pytest.mark.parametrize(("env", "files", "accepted", "refused"), SECRET_SOURCES)
async def test_secrets_from_each_source_authenticate_webhooks(
    start_sidecar: StartSidecar,
    tmp_path: Path,
    env: dict[str, str],
    files: dict[str, str],
    accepted: list[str],
    refused: list[str],
) -> None:
    secrets_dir = tmp_path / "credentials"
    secrets_dir.mkdir()
    for name, content in files.items():
        (secrets_dir / name).write_text(content)
    env = {key: value.format(dir=secrets_dir) for key, value in env.items()}
    running = await start_sidecar(env=env)

    statuses = {kind: await _post_as(running, kind) for kind in accepted + refused}

    assert statuses == {
        **{kind: 200 for kind in accepted},
        **{kind: 401 for kind in refused},
    }


BAD_SETTINGS = [
    # environment (None unsets), TOML file, flags, texts the error must contain,
    # and whether the case also runs through a real `serve` process.
    pytest.param(
        {"SIDECAR_WEBHOOK_LISTEN": "127.0.0.1:65536"},
        None,
        {},
        ["SIDECAR_WEBHOOK_LISTEN", "'127.0.0.1:65536'"],
        True,
        id="port-too-large",
    ),
    pytest.param(
        {"SIDECAR_LOOKUP_LISTEN": "127.0.0.1:http"},
        None,
        {},
        ["SIDECAR_LOOKUP_LISTEN", "'127.0.0.1:http'"],
        False,
        id="port-not-a-number",
    ),
    pytest.param(
        {"SIDECAR_LOOKUP_LISTEN": "localhost"},
        None,
        {},
        ["SIDECAR_LOOKUP_LISTEN", "'localhost'"],
        True,
        id="listen-without-port",
    ),
    pytest.param(
        {"SIDECAR_LOOKUP_LISTEN": "unix:run/lookup.sock"},
        None,
        {},
        ["SIDECAR_LOOKUP_LISTEN", "'unix:run/lookup.sock'"],
        False,
        id="unix-relative-path",
    ),
    pytest.param(
        {},
        None,
        {"webhook_listen": "everywhere"},
        ["--webhook-listen", "'everywhere'"],
        False,
        id="listen-flag",
    ),
    pytest.param(
        {"SIDECAR_GRACE_SECONDS": "-1"},
        None,
        {},
        ["SIDECAR_GRACE_SECONDS", "'-1'"],
        True,
        id="negative-grace",
    ),
    pytest.param(
        {"SIDECAR_GRACE_SECONDS": "1h"},
        None,
        {},
        ["SIDECAR_GRACE_SECONDS", "'1h'"],
        True,
        id="grace-with-unit",
    ),
    pytest.param(
        {"SIDECAR_RETENTION_DAYS": "2.5"},
        None,
        {},
        ["SIDECAR_RETENTION_DAYS", "'2.5'"],
        False,
        id="fractional-days",
    ),
    pytest.param(
        {"SIDECAR_MAX_BODY_BYTES": "lots"},
        None,
        {},
        ["SIDECAR_MAX_BODY_BYTES", "'lots'"],
        False,
        id="body-limit-not-integer",
    ),
    pytest.param(
        {"SIDECAR_LOOKUP_ALLOW_REMOTE": "maybe"},
        None,
        {},
        ["SIDECAR_LOOKUP_ALLOW_REMOTE", "'maybe'"],
        False,
        id="not-a-boolean",
    ),
    pytest.param(
        {"SIDECAR_PRODUCT": "my module"},
        None,
        {},
        ["SIDECAR_PRODUCT", "'my module'"],
        False,
        id="product",
    ),
    pytest.param(
        {"SIDECAR_DB": ""},
        None,
        {},
        ["SIDECAR_DB", "''"],
        False,
        id="empty-db-path",
    ),
    pytest.param(
        {},
        "grace = 60\n",
        {},
        ["SIDECAR_CONFIG", "'grace'", "{config}"],
        True,
        id="unknown-toml-key",
    ),
    pytest.param(
        {},
        "grace_seconds = -5\n",
        {},
        ["SIDECAR_GRACE_SECONDS", "-5"],
        False,
        id="bad-value-in-toml",
    ),
    pytest.param(
        {"SIDECAR_LOOKUP_LISTEN": None},
        'lookup_listen = "0.0.0.0:0"\n',
        {},
        ["SIDECAR_LOOKUP_LISTEN", "'0.0.0.0:0'", "SIDECAR_LOOKUP_ALLOW_REMOTE"],
        False,
        id="remote-lookup-from-toml",
    ),
    pytest.param(
        {},
        "grace_seconds = \n",
        {},
        ["SIDECAR_CONFIG", "{config}"],
        True,
        id="malformed-toml",
    ),
    pytest.param(
        {"SIDECAR_CONFIG": "{dir}/missing.toml"},
        None,
        {},
        ["SIDECAR_CONFIG", "{dir}/missing.toml"],
        True,
        id="missing-config",
    ),
    pytest.param(
        {},
        None,
        {"config": "{dir}"},
        ["--config", "{dir}"],
        False,
        id="config-is-a-directory",
    ),
    pytest.param(
        {
            "SIDECAR_WEBHOOK_SECRET": None,
            "SIDECAR_WEBHOOK_SECRET_FILE": "{dir}/missing-secret",
        },
        None,
        {},
        ["SIDECAR_WEBHOOK_SECRET_FILE", "{dir}/missing-secret"],
        False,
        id="missing-secret-file",
    ),
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": None, "SIDECAR_WEBHOOK_LISTEN": "0.0.0.0:0"},
        None,
        {},
        ["SIDECAR_WEBHOOK_LISTEN", "'0.0.0.0:0'", "SIDECAR_WEBHOOK_SECRET"],
        True,
        id="public-webhook-bind-without-auth",
    ),
    pytest.param(
        {"SIDECAR_LOOKUP_LISTEN": "0.0.0.0:0"},
        None,
        {},
        ["SIDECAR_LOOKUP_LISTEN", "'0.0.0.0:0'", "SIDECAR_LOOKUP_ALLOW_REMOTE=true"],
        True,
        id="public-lookup-bind",
    ),
    pytest.param(
        {"SIDECAR_LOOKUP_LISTEN": "[::]:0"},
        None,
        {},
        ["SIDECAR_LOOKUP_LISTEN", "'[::]:0'", "SIDECAR_LOOKUP_ALLOW_REMOTE=true"],
        False,
        id="public-ipv6-lookup-bind",
    ),
]

BAD_SECRETS = [
    # environment, texts that must never be printed, the setting named, and
    # whether the case also runs through a real `serve` process.
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": "whsec_Zm9vYmFyYmF6c"},
        None,
        ["Zm9vYmFyYmF6c"],
        "SIDECAR_WEBHOOK_SECRET",
        True,
        id="bad-padding",
    ),
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": "plain-shared-password"},
        None,
        ["plain-shared-password"],
        "SIDECAR_WEBHOOK_SECRET",
        False,
        id="no-whsec-prefix",
    ),
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": f"{SECRET} whsec_!!!!"},
        None,
        [SECRET.removeprefix("whsec_"), "!!!!"],
        "SIDECAR_WEBHOOK_SECRET",
        False,
        id="one-good-one-bad",
    ),
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": None},
        'webhook_secret = "whsec_c2VjcmV0LXZhbHVl-x"\n',
        ["c2VjcmV0LXZhbHVl"],
        "SIDECAR_WEBHOOK_SECRET",
        False,
        id="secret-in-toml",
    ),
    pytest.param(
        {"SIDECAR_WEBHOOK_SECRET": None, "SIDECAR_BASIC_AUTH": "hunter2-no-colon!"},
        None,
        ["hunter2-no-colon!"],
        "SIDECAR_BASIC_AUTH",
        True,
        id="basic-token-neither-form",
    ),
]


def _prepare(
    tmp_path: Path, env: dict[str, str | None], toml: str | None, flags: dict[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """The environment and flags of a valid setup, changed as the case says."""
    values = {"dir": str(tmp_path), "config": str(tmp_path / "sidecar.toml")}
    full_env = {
        "SIDECAR_DB": str(tmp_path / "sidecar.db"),
        "SIDECAR_WEBHOOK_SECRET": SECRET,
        "SIDECAR_WEBHOOK_LISTEN": "127.0.0.1:0",
        "SIDECAR_LOOKUP_LISTEN": "127.0.0.1:0",
    }
    for key, value in env.items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value.format(**values)
    flags = {key: value.format(**values) for key, value in flags.items()}
    if toml is not None:
        Path(values["config"]).write_text(toml)
        flags["config"] = values["config"]
    return full_env, flags


def _refusal_in_process(
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    flags: dict[str, str],
) -> str:
    """Load settings and secrets as `serve` does; return the refusal message."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = flags.pop("config", None)
    with pytest.raises(SettingsError) as refused:
        settings = load_settings(config, flags)
        check_bind_safety(settings, load_secrets(settings))
    return str(refused.value)


def _refusal_of_serve(env: dict[str, str], flags: dict[str, str]) -> tuple[int, str]:
    """Run `serve`; a refused setting stops it before it binds anything."""
    args = [f"--{key.replace('_', '-')}={value}" for key, value in flags.items()]
    result = run_cli("serve", *args, env=env, timeout=REFUSAL_TIMEOUT_S)
    assert result.stdout == ""
    return result.returncode, result.stderr


def _cases_for_serve(cases: list[Any]) -> list[Any]:
    return [case for case in cases if case.values[-1]]


@pytest.mark.parametrize(("env", "toml", "flags", "named", "via_serve"), BAD_SETTINGS)
def test_settings_with_bad_value_are_refused_naming_setting_and_value(
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    env: dict[str, str | None],
    toml: str | None,
    flags: dict[str, str],
    named: list[str],
    via_serve: bool,
) -> None:
    full_env, full_flags = _prepare(tmp_path, env, toml, flags)

    message = _refusal_in_process(monkeypatch, full_env, full_flags)

    assert "\n" not in message
    for text in named:
        assert text.format(dir=tmp_path, config=tmp_path / "sidecar.toml") in message


@pytest.mark.parametrize(
    ("env", "toml", "flags", "named", "via_serve"), _cases_for_serve(BAD_SETTINGS)
)
def test_serve_with_bad_setting_exits_2_with_one_line_naming_it(
    tmp_path: Path,
    env: dict[str, str | None],
    toml: str | None,
    flags: dict[str, str],
    named: list[str],
    via_serve: bool,
) -> None:
    code, stderr = _refusal_of_serve(*_prepare(tmp_path, env, toml, flags))

    assert code == 2, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("entitlement-sidecar: ")
    for text in named:
        assert text.format(dir=tmp_path, config=tmp_path / "sidecar.toml") in stderr


@pytest.mark.parametrize(("env", "toml", "hidden", "setting", "via_serve"), BAD_SECRETS)
def test_settings_with_bad_secret_are_refused_without_printing_it(
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    env: dict[str, str | None],
    toml: str | None,
    hidden: list[str],
    setting: str,
    via_serve: bool,
) -> None:
    full_env, flags = _prepare(tmp_path, env, toml, {})

    message = _refusal_in_process(monkeypatch, full_env, flags)

    assert setting in message
    for text in hidden:
        assert text not in message


@pytest.mark.parametrize(
    ("env", "toml", "hidden", "setting", "via_serve"), _cases_for_serve(BAD_SECRETS)
)
def test_serve_with_bad_secret_exits_2_without_printing_it(
    tmp_path: Path,
    env: dict[str, str | None],
    toml: str | None,
    hidden: list[str],
    setting: str,
    via_serve: bool,
) -> None:
    code, stderr = _refusal_of_serve(*_prepare(tmp_path, env, toml, {}))

    assert code == 2, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert setting in stderr
    for text in hidden:
        assert text not in stderr


async def test_serve_without_auth_on_loopback_starts_with_a_warning(
    sidecar_process: Callable[..., Process],
) -> None:
    process = sidecar_process(env={"SIDECAR_WEBHOOK_SECRET": ""})

    async with (
        aiohttp.ClientSession() as session,
        session.post(process.webhook_url + "/webhooks", json=IGNORED_EVENT) as response,
    ):
        status = response.status

    warnings = [line for line in process.startup_log if "WARNING" in line]
    assert len(warnings) == 1
    assert "SIDECAR_WEBHOOK_SECRET" in warnings[0]
    assert "127.0.0.1" in warnings[0]
    assert status == 200
    assert process.terminate() == 0


async def test_serve_on_public_binds_starts_quietly_when_authenticated_and_allowed(
    sidecar_process: Callable[..., Process],
) -> None:
    env = {
        "SIDECAR_WEBHOOK_LISTEN": "0.0.0.0:0",
        "SIDECAR_LOOKUP_LISTEN": "0.0.0.0:0",
        "SIDECAR_LOOKUP_ALLOW_REMOTE": "true",
    }
    process = sidecar_process(env=env)
    port = process.lookup_url.rsplit(":", 1)[1]

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/healthz") as response,
    ):
        status = response.status

    assert status == 200
    assert process.webhook_url.startswith("http://0.0.0.0:")
    assert process.lookup_url.startswith("http://0.0.0.0:")
    assert not [line for line in process.startup_log if "WARNING" in line]
    assert process.terminate() == 0


async def test_serve_lookup_listen_flag_beats_refused_env_value(
    sidecar_process: Callable[..., Process],
) -> None:
    process = sidecar_process(
        env={"SIDECAR_LOOKUP_LISTEN": "0.0.0.0:0"},
        args=["--lookup-listen", "127.0.0.1:0"],
    )

    assert process.lookup_url.startswith("http://127.0.0.1:")
    assert process.terminate() == 0
