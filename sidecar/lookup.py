"""The lookup listener: entitlement answers for local module code, and ops routes."""

from __future__ import annotations

import sqlite3
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import log
from .answers import Answer, serialise, unknown_shop
from .app import SIDECAR, Sidecar, error_response, json_response
from .fetch import FetchStatus
from .resources import read_resource
from .settings import PRODUCT_PATTERN, SHOP_ID_PATTERN
from .storage import StorageUnavailable


async def entitlement(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    started = time.perf_counter()
    shop_id = request.match_info["shop"]
    if not SHOP_ID_PATTERN.fullmatch(shop_id):
        return _bad_request(
            sidecar, "a shop id is 1 to 64 characters of A-Z a-z 0-9 _ -"
        )
    product = sidecar.settings.product
    # Most lookups ask for the default product: skip parsing an empty query.
    if request.query_string:
        product = request.query.get("product", product)
        if not PRODUCT_PATTERN.fullmatch(product):
            return _bad_request(
                sidecar, "a product is 1 to 64 characters of A-Z a-z 0-9 _ . -"
            )

    try:
        found = sidecar.answers.find(shop_id, product, sidecar.clock())
        if not found.known and sidecar.fetcher is not None:
            found = await _fetch_missing(sidecar, shop_id, product)
    except (sqlite3.Error, StorageUnavailable) as exc:
        sidecar.metrics.lookups.count("unavailable")
        log.lookup.error("lookup failed: %s", exc)
        return error_response(503, "storage unavailable", {"Retry-After": "1"})

    sidecar.metrics.lookups.count(found.reason, time.perf_counter() - started)
    if sidecar.settings.log_lookups:
        log.lookup.info(
            "lookup shop=%s product=%s reason=%s", shop_id, product, found.reason
        )
    return web.Response(
        body=found.body, status=found.status, content_type="application/json"
    )


def _bad_request(sidecar: Sidecar, reason: str) -> web.Response:
    sidecar.metrics.lookups.count("bad_request")
    return error_response(400, reason)


async def _fetch_missing(sidecar: Sidecar, shop_id: str, product: str) -> Answer:
    """Ask the Billing API about a shop the table does not know.

    A shop the API could not be asked about is answered `upstream_unavailable`,
    not `unknown_shop`, and that answer is never kept: the next lookup asks
    again.
    """
    assert sidecar.fetcher is not None
    fetched = await sidecar.fetcher.fetch(shop_id, product)
    if fetched.status is FetchStatus.FOUND:
        assert fetched.entitlement is not None
        return serialise(
            fetched.entitlement, sidecar.clock(), sidecar.settings.grace_seconds
        )
    if fetched.status is FetchStatus.UNKNOWN:
        return unknown_shop(shop_id)
    return unknown_shop(shop_id, "upstream_unavailable")


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    if not sidecar.ready:
        return error_response(503, "starting")
    if sidecar.cluster is not None:
        # In multi-host mode the table is only current once caught up.
        behind = sidecar.cluster.not_ready_reason()
        if behind is not None:
            return error_response(503, behind)
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    await sidecar.refresh_storage_gauges()
    return web.Response(
        body=generate_latest(sidecar.metrics.registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


async def openapi(request: web.Request) -> web.Response:
    return web.Response(
        text=read_resource("openapi.yaml"), content_type="application/yaml"
    )


async def _method_not_allowed(request: web.Request) -> web.Response:
    return error_response(405, "Method Not Allowed", {"Allow": "GET,HEAD"})


async def _not_found(request: web.Request) -> web.Response:
    return error_response(404, "Not Found")


def create_app(sidecar: Sidecar) -> web.Application:
    # No middleware, which every lookup would pay for: routing errors get the
    # JSON error shape from the catch-all routes below instead.
    app = web.Application()
    app[SIDECAR] = sidecar
    routes = {
        # Anything at all, newlines and slashes included, so that an empty id
        # or one with a slash reaches the handler and gets a 400 that says what
        # a shop id is, rather than a bare 404.
        r"/entitlement/{shop:[\s\S]*}": entitlement,
        "/healthz": healthz,
        "/readyz": readyz,
        "/metrics": metrics,
        "/openapi.yaml": openapi,
    }
    for path, handler in routes.items():
        app.router.add_get(path, handler)
        app.router.add_route("*", path, _method_not_allowed)
    app.router.add_route("*", r"/{path:[\s\S]*}", _not_found)
    return app
