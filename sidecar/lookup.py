"""The lookup listener: entitlement answers for local module code, and ops routes."""

from __future__ import annotations

import sqlite3
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import log
from .app import SIDECAR, Sidecar, error_response, json_errors, json_response
from .entitlement import StoredEntitlement, answer, evaluate, unknown_shop_answer
from .fetch import Fetcher, FetchStatus
from .resources import read_resource
from .settings import PRODUCT_PATTERN, SHOP_ID_PATTERN
from .storage import StorageUnavailable, read_entitlement


async def entitlement(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    started = time.perf_counter()
    shop_id = request.match_info["shop"]
    product = request.query.get("product", sidecar.settings.product)

    if not SHOP_ID_PATTERN.fullmatch(shop_id):
        sidecar.metrics.lookups.labels("bad_request").inc()
        return error_response(400, "a shop id is 1 to 64 characters of A-Z a-z 0-9 _ -")
    if not PRODUCT_PATTERN.fullmatch(product):
        sidecar.metrics.lookups.labels("bad_request").inc()
        return error_response(
            400, "a product is 1 to 64 characters of A-Z a-z 0-9 _ . -"
        )

    missing_reason = "unknown_shop"
    try:
        row = read_entitlement(sidecar.reader, shop_id, product)
        if row is None and sidecar.fetcher is not None:
            row, missing_reason = await _fetch_missing(
                sidecar.fetcher, shop_id, product
            )
    except (sqlite3.Error, StorageUnavailable) as exc:
        sidecar.metrics.lookups.labels("unavailable").inc()
        log.lookup.error("lookup failed: %s", exc)
        return error_response(503, "storage unavailable", {"Retry-After": "1"})

    if row is None:
        status, payload = 404, unknown_shop_answer(shop_id, missing_reason)
    else:
        verdict = evaluate(row, sidecar.clock(), sidecar.settings.grace_seconds)
        status, payload = 200, answer(row, verdict)

    result = str(payload["reason"])
    sidecar.metrics.lookups.labels(result).inc()
    sidecar.metrics.lookup_seconds.observe(time.perf_counter() - started)
    if sidecar.settings.log_lookups:
        log.lookup.info("lookup shop=%s product=%s reason=%s", shop_id, product, result)
    return json_response(payload, status)


async def _fetch_missing(
    fetcher: Fetcher, shop_id: str, product: str
) -> tuple[StoredEntitlement | None, str]:
    """Ask the Billing API about a shop the table does not know.

    Return the stored row, if the API knew the shop, and the reason to give
    when there is none: a shop the API could not be asked about is not the same
    as one it does not know.
    """
    fetched = await fetcher.fetch(shop_id, product)
    if fetched.status is FetchStatus.FOUND:
        return fetched.entitlement, "unknown_shop"
    if fetched.status is FetchStatus.UNKNOWN:
        return None, "unknown_shop"
    return None, "upstream_unavailable"


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


def create_app(sidecar: Sidecar) -> web.Application:
    app = web.Application(middlewares=[json_errors])
    app[SIDECAR] = sidecar
    # Anything at all, newlines and slashes included, so that an empty id or
    # one with a slash reaches the handler and gets a 400 that says what a shop
    # id is, rather than a bare 404.
    app.router.add_get(r"/entitlement/{shop:[\s\S]*}", entitlement)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.yaml", openapi)
    return app
