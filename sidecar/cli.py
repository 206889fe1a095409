"""The `entitlement-sidecar` command: run the service, or read and repair its data."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sqlite3
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import log
from .answers import encode
from .billing import credentials_from_settings
from .entitlement import StoredEntitlement, answer, evaluate, unknown_shop_answer
from .settings import (
    PRODUCT_PATTERN,
    SHOP_ID_PATTERN,
    Settings,
    SettingsError,
    check_bind_safety,
    load_secrets,
    load_settings,
    parse_listen,
)
from .storage import connect, open_database, read_entitlement

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    flags = {
        "db": args.db,
        "product": args.product,
        "webhook_listen": getattr(args, "webhook_listen", None),
        "lookup_listen": getattr(args, "lookup_listen", None),
    }
    try:
        settings = load_settings(args.config, flags)
        code: int = args.command(settings, args)
    except SettingsError as exc:
        print(f"entitlement-sidecar: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except sqlite3.Error as exc:
        print(f"entitlement-sidecar: database error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return code


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="TOML settings file")
    common.add_argument("--db", metavar="PATH", help="SQLite database file")
    common.add_argument("--product", help="product when none is given")

    parser = argparse.ArgumentParser(
        prog="entitlement-sidecar",
        description="Keep PrestaShop Billing entitlements and answer lookups.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run both listeners")
    serve.add_argument("--webhook-listen", metavar="HOST:PORT")
    serve.add_argument("--lookup-listen", metavar="HOST:PORT|unix:PATH")
    serve.set_defaults(command=_serve)

    lookup = commands.add_parser(
        "lookup", parents=[common], help="print a shop's entitlement"
    )
    lookup.add_argument("shop_id", metavar="SHOP")
    lookup.set_defaults(command=_lookup)

    events = commands.add_parser(
        "events", parents=[common], help="list stored deliveries, newest first"
    )
    events.add_argument("--shop", help="only this shop")
    events.add_argument("--result", help="only this result, e.g. applied or stale")
    events.add_argument("--limit", type=int, default=50)
    events.add_argument(
        "--quarantine", action="store_true", help="list refused deliveries instead"
    )
    events.add_argument("--json", action="store_true", help="one JSON object a line")
    events.set_defaults(command=_events)

    replay = commands.add_parser(
        "replay",
        parents=[common],
        help="rebuild the entitlement table from stored deliveries",
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="report differences, change nothing"
    )
    replay.set_defaults(command=_replay)

    send = commands.add_parser(
        "send", parents=[common], help="sign a body and post it to a running sidecar"
    )
    send.add_argument("file", metavar="FILE", help="JSON body to send ('-': stdin)")
    send.add_argument("--event-type", help="for draft bodies: /webhooks/<type>")
    send.add_argument("--url", help="webhook URL (default: from the settings)")
    send.add_argument("--id", dest="delivery_id", help="webhook-id (default: new)")
    send.add_argument("--webhook-listen", metavar="HOST:PORT")
    send.set_defaults(command=_send)

    reconcile = commands.add_parser(
        "reconcile",
        parents=[common],
        help="re-fetch shops from the Billing API and apply what is newer",
    )
    reconcile.add_argument(
        "shops", metavar="SHOP", nargs="*", help="shops to re-fetch (default: all)"
    )
    reconcile.set_defaults(command=_reconcile)

    import_ = commands.add_parser(
        "import",
        parents=[common],
        help="apply a JSON-lines file of event bodies or subscriptions",
    )
    import_.add_argument(
        "file", metavar="FILE", help="JSON lines to apply ('-': stdin)"
    )
    import_.set_defaults(command=_import)

    backup = commands.add_parser(
        "backup", parents=[common], help="copy the database while it is in use"
    )
    backup.add_argument("path", metavar="PATH", help="file to write the copy to")
    backup.set_defaults(command=_backup)
    return parser


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from .server import serve

    secrets = load_secrets(settings)
    warnings = check_bind_safety(settings, secrets)
    credentials = credentials_from_settings(settings, secrets)
    if settings.fetch_on_miss and credentials is None:
        raise SettingsError(
            "SIDECAR_FETCH_ON_MISS=true needs Billing API credentials: set"
            " SIDECAR_BILLING_CLIENT_ID and SIDECAR_BILLING_CLIENT_SECRET"
        )
    log.configure(settings.log_format, settings.log_level)
    return _run_async(lambda: serve(settings, secrets, warnings))


def _run_async(start: Callable[[], Coroutine[Any, Any, int]]) -> int:
    # uvloop, when installed, roughly halves the cost of each request.
    try:
        from uvloop import new_event_loop
    except ImportError:
        return asyncio.run(start())
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(start())


def _open_existing(settings: Settings) -> sqlite3.Connection:
    if not Path(settings.db).is_file():
        raise SettingsError(f"SIDECAR_DB (--db): no database at {settings.db!r}")
    return open_database(settings.db, settings.busy_timeout_ms)


def _lookup(settings: Settings, args: argparse.Namespace) -> int:
    if not SHOP_ID_PATTERN.fullmatch(args.shop_id):
        print("a shop id is 1 to 64 characters of A-Z a-z 0-9 _ -", file=sys.stderr)
        return EXIT_USAGE
    conn = _open_existing(settings)
    row = read_entitlement(conn, args.shop_id, settings.product)
    conn.close()
    # The same bytes the lookup listener sends, so scripts can use either.
    if row is None:
        _print_bytes(encode(unknown_shop_answer(args.shop_id)))
        return EXIT_FAILURE
    verdict = evaluate(row, time.time(), settings.grace_seconds)
    _print_bytes(encode(answer(row, verdict)))
    return EXIT_OK


def _print_bytes(line: bytes) -> None:
    # Written as bytes: printed text would take the locale's encoding.
    sys.stdout.flush()
    sys.stdout.buffer.write(line + b"\n")
    sys.stdout.buffer.flush()


def _events(settings: Settings, args: argparse.Namespace) -> int:
    conn = _open_existing(settings)
    if args.quarantine:
        columns = ["last_seen_at", "delivery_id", "status", "attempts", "reason"]
        sql = f"SELECT {', '.join(columns)} FROM quarantine"
        order = "last_seen_at"
        filters: list[tuple[str, object]] = []
    else:
        columns = [
            "received_at",
            "delivery_id",
            "event_type",
            "shop_id",
            "product",
            "result",
            "status",
            "plan",
        ]
        sql = f"SELECT {', '.join(columns)} FROM deliveries"
        order = "received_at"
        filters = [("shop_id", args.shop), ("result", args.result)]
    conditions = [(f"{column} = ?", value) for column, value in filters if value]
    if conditions:
        sql += " WHERE " + " AND ".join(text for text, _ in conditions)
    sql += f" ORDER BY {order} DESC, rowid DESC LIMIT ?"
    params = [value for _, value in conditions] + [args.limit]
    rows = conn.execute(sql, params).fetchall()
    conn.close()

    for row in rows:
        record = dict(zip(columns, row, strict=True))
        if args.json:
            print(json.dumps(record))
        else:
            record[columns[0]] = _iso(record[columns[0]])
            print(
                "  ".join(
                    "-" if value is None else str(value) for value in record.values()
                )
            )
    return EXIT_OK


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    from .replay import rebuild

    conn = _open_existing(settings)
    differences = rebuild(conn, dry_run=args.dry_run)
    conn.close()
    for difference in differences:
        shop_id, product = difference.key
        where = f"{difference.table} {shop_id}" + (f" {product}" if product else "")
        print(f"{where}: {difference.before} -> {difference.after}")
    verb = "would change" if args.dry_run else "changed"
    print(f"replay {verb} {len(differences)} row(s)")
    return EXIT_OK


def _send(settings: Settings, args: argparse.Namespace) -> int:
    from standardwebhooks.webhooks import Webhook

    try:
        body = (
            sys.stdin.buffer.read()
            if args.file == "-"
            else Path(args.file).read_bytes()
        )
    except OSError as exc:
        print(f"cannot read {args.file!r}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    secrets = load_secrets(settings)
    headers = {"Content-Type": "application/json"}
    delivery_id = args.delivery_id or f"msg_{uuid.uuid4().hex}"
    headers["webhook-id"] = delivery_id
    if secrets.signing_keys:
        now = datetime.now(UTC)
        headers["webhook-timestamp"] = str(int(now.timestamp()))
        headers["webhook-signature"] = Webhook(secrets.signing_keys[0]).sign(
            delivery_id, now, body
        )
    elif secrets.basic_tokens:
        headers["Authorization"] = "Basic " + secrets.basic_tokens[0].decode()

    if args.event_type and not PRODUCT_PATTERN.fullmatch(args.event_type):
        raise SettingsError(f"--event-type: not an event name: {args.event_type!r}")
    path = "/webhooks" + (f"/{args.event_type}" if args.event_type else "")
    listen = parse_listen(args.webhook_listen or settings.webhook_listen)
    return _run_async(
        lambda: _post(args.url, listen.path, str(listen), path, body, headers)
    )


async def _post(
    url: str | None,
    unix_path: str,
    listen: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
) -> int:
    import aiohttp

    connector: aiohttp.BaseConnector | None = None
    if url is None and unix_path:
        connector = aiohttp.UnixConnector(path=unix_path)
        url = f"http://localhost{path}"
    elif url is None:
        host = listen.replace("0.0.0.0", "127.0.0.1")
        url = f"http://{host}{path}"
    try:
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(url, data=body, headers=headers) as response,
        ):
            text = await response.text()
    except aiohttp.ClientError as exc:
        print(f"cannot reach the sidecar at {url}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{response.status} {text}")
    return EXIT_OK if 200 <= response.status < 300 else EXIT_FAILURE


def _reconcile(settings: Settings, args: argparse.Namespace) -> int:
    from .billing import client_from_settings
    from .importer import reconcile

    for shop_id in args.shops:
        if not SHOP_ID_PATTERN.fullmatch(shop_id):
            print(f"not a shop id: {shop_id!r}", file=sys.stderr)
            return EXIT_USAGE
    secrets = load_secrets(settings)
    if credentials_from_settings(settings, secrets) is None:
        raise SettingsError(
            "reconcile needs Billing API credentials: set SIDECAR_BILLING_CLIENT_ID"
            " and SIDECAR_BILLING_CLIENT_SECRET"
        )
    conn = _open_existing(settings)

    async def run() -> int:
        client = client_from_settings(settings, secrets)
        assert client is not None
        async with client:
            results = await reconcile(conn, client, args.shops, settings.product)
        failed = 0
        for result in results:
            where = f"{result.shop_id} {result.product}"
            if result.result == "failed":
                failed += 1
                print(f"{where}: failed: {result.error}")
            elif result.result == "applied":
                print(f"{where}: {_state(result.before)} -> {_state(result.after)}")
        counts = Counter(result.result for result in results)
        summary = ", ".join(f"{n} {result}" for result, n in sorted(counts.items()))
        print(f"reconciled {len(results)} shop(s): {summary or 'nothing to do'}")
        return EXIT_FAILURE if failed else EXIT_OK

    try:
        return _run_async(run)
    finally:
        conn.close()


def _state(row: StoredEntitlement | None) -> str:
    if row is None:
        return "unknown"
    return f"{row.status} {row.plan or '-'}"


def _import(settings: Settings, args: argparse.Namespace) -> int:
    from .importer import import_lines

    conn = _open_existing(settings)
    try:
        if args.file == "-":
            report = import_lines(conn, sys.stdin.buffer, settings.product)
        else:
            with open(args.file, "rb") as lines:
                report = import_lines(conn, lines, settings.product)
    except OSError as exc:
        print(f"cannot read {args.file!r}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        conn.close()
    for bad in report.bad_lines:
        print(f"line {bad.line_number}: {bad.reason}", file=sys.stderr)
    summary = ", ".join(f"{n} {result}" for result, n in sorted(report.counts.items()))
    print(f"imported {sum(report.counts.values())} line(s): {summary or 'none'}")
    return EXIT_FAILURE if report.bad_lines else EXIT_OK


def _backup(settings: Settings, args: argparse.Namespace) -> int:
    target = Path(args.path)
    if target.exists():
        raise SettingsError(f"backup: {args.path!r} exists; choose a new file")
    source = _open_existing(settings)
    copy = connect(str(target))
    # The backup API copies a consistent snapshot while writers carry on.
    with copy:
        source.backup(copy)
    copy.close()
    source.close()
    print(f"backed up {settings.db} to {target}")
    return EXIT_OK


def basic_header(token: str) -> str:
    """The Authorization value for a `user:password` token."""
    return "Basic " + base64.b64encode(token.encode()).decode()
