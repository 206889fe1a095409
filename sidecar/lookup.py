"""The lookup listener: entitlement answers for local module code, and ops routes.

It runs on aiohttp's low-level server and routes by itself: every lookup would
pay for an Application's router, match info and handler chain, which cost more
than answering from the cache. Any path that is not a route, whatever the
request target, gets the JSON 404; a route asked with a method other than GET
or HEAD gets the JSON 405 with an Allow header.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import log
from .answers import Answer, serialise, unknown_shop
from .app import Sidecar, error_response, json_response, path_parameter
from .fetch import FetchStatus
from .resources import read_resource
from .settings import PRODUCT_PATTERN, SHOP_ID_PATTERN
from .storage import StorageUnavailable

ENTITLEMENT_PREFIX = "/entitlement/"
_READ_METHODS = frozenset({"GET", "HEAD"})
OpsRoute = Callable[[Sidecar], Awaitable[web.Response]]


def create_server(sidecar: Sidecar, **handler_options: Any) -> web.Server:
    """The lookup listener's request handler, on aiohttp's low-level server."""
    ops: dict[str, OpsRoute] = {
        "/healthz": healthz,
        "/readyz": readyz,
        "/metrics": metrics,
        "/openapi.yaml": openapi,
    }

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        # The path as aiohttp's router matches it: decoded, except %2F and %25.
        path = request.rel_url.path_safe
        if path.startswith(ENTITLEMENT_PREFIX):
            if request.method not in _READ_METHODS:
                return _method_not_allowed()
            return await entitlement(sidecar, request, _shop_of(path))
        route = ops.get(path)
        if route is None:
            return error_response(404, "Not Found")
        if request.method not in _READ_METHODS:
            return _method_not_allowed()
        return await route(sidecar)

    return web.Server(handle, **handler_options)


def _shop_of(path: str) -> str:
    # Anything at all after the prefix, newlines and slashes included, so that
    # an empty id or one with a slash gets a 400 that says what a shop id is,
    # rather than a bare 404.
    return path_parameter(path[len(ENTITLEMENT_PREFIX) :])


async def entitlement(
    sidecar: Sidecar, request: web.BaseRequest, shop_id: str
) -> web.Response:
    started = time.perf_counter()
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


async def healthz(sidecar: Sidecar) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(sidecar: Sidecar) -> web.Response:
    if not sidecar.ready:
        return error_response(503, "starting")
    if sidecar.cluster is not None:
        # In multi-host mode the table is only current once caught up.
        behind = sidecar.cluster.not_ready_reason()
        if behind is not None:
            return error_response(503, behind)
    return json_response({"status": "ready"})


async def metrics(sidecar: Sidecar) -> web.Response:
    await sidecar.refresh_storage_gauges()
    return web.Response(
        body=generate_latest(sidecar.metrics.registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


async def openapi(sidecar: Sidecar) -> web.Response:
    return web.Response(
        text=read_resource("openapi.yaml"), content_type="application/yaml"
    )


def _method_not_allowed() -> web.Response:
    return error_response(405, "Method Not Allowed", {"Allow": "GET,HEAD"})
