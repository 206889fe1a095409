"""The ceiling for lookups: bare aiohttp answering one constant JSON body.

It runs on the default asyncio loop with no middleware, no database and no
metrics, so the sidecar's figures can be read as a fraction of what aiohttp
itself does on the same core. Prints "listening on ADDRESS" once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from aiohttp import web


def create_app(body: bytes) -> web.Application:
    async def constant(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/entitlement/{shop}", constant)
    return app


async def serve(listen: str, body: bytes) -> None:
    runner = web.AppRunner(create_app(body), access_log=None)
    await runner.setup()
    site: web.BaseSite
    if listen.startswith("unix:"):
        site = web.UnixSite(runner, listen.removeprefix("unix:"))
    else:
        host, _, port = listen.rpartition(":")
        site = web.TCPSite(runner, host, int(port))
    await site.start()

    address = runner.addresses[0]
    if isinstance(address, str):
        print(f"listening on unix:{address}", flush=True)
    else:
        print(f"listening on {address[0]}:{address[1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT|unix:PATH")
    parser.add_argument("--body", required=True, help="the JSON body to answer")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.body.encode()))


if __name__ == "__main__":
    main()
