"""The only door from the hospitals' network to the SuperLink: Fleet API routes, nothing else.

    python -m deploy.fleet_proxy --listen 0.0.0.0:8000 --upstream superlink:8000 \\
        --ca certificates/ca.pem --certfile certificates/server.pem \\
        --keyfile certificates/server.key

flwr 1.41 and 1.42 serve the Fleet API (``/v1/fleet/...``, what SuperNodes call), the Control API
(``/v1/control/...``: register nodes, start runs; no authentication in the open-source
SuperLink) and the Runtime API (``/v1/runtime/...``) on one HTTPS port, and cannot bind them
apart. This proxy terminates TLS with the SuperLink's certificate, forwards ``POST`` requests
to exactly the routes Flower's Fleet router defines (read from the installed flwr, so the
list follows the version in use) to the SuperLink over TLS, and answers everything else
with 404 itself. The SuperLink then listens on the coordinator's internal network or
loopback only. Node authentication is untouched: the SuperLink checks each request's signed
headers, which pass through unchanged.

Needs only flwr and what it installs (starlette, uvicorn, httpx): it runs in the app image.
"""

from __future__ import annotations

import argparse
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones httpx/uvicorn set themselves.
DROPPED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
MAX_BODY = 64 << 20  # bytes; Flower sends objects in chunks of at most a few MB


def fleet_routes() -> frozenset[str]:
    """The paths of every route of the installed flwr's Fleet API (all POST)."""
    from flwr.superlink.routers.fleet.router import router

    paths = frozenset(route.path for route in router.routes)  # type: ignore[attr-defined]
    if not paths or not all(path.startswith("/v1/fleet/") for path in paths):
        raise RuntimeError(f"unexpected Fleet API routes in the installed flwr: {paths}")
    return paths


def create_app(upstream: str, ca: Path, routes: frozenset[str] | None = None) -> Starlette:
    """The proxy as an ASGI app: ``upstream`` is the SuperLink's ``host:port`` (TLS, trusted
    through ``ca``); ``routes`` defaults to :func:`fleet_routes`."""
    allowed = fleet_routes() if routes is None else routes
    verify = ssl.create_default_context(cafile=str(ca))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(
            base_url=f"https://{upstream}", verify=verify, timeout=httpx.Timeout(120.0)
        ) as client:
            app.state.client = client
            yield

    async def forward(request: Request) -> Response:
        if request.url.path not in allowed or request.method != "POST":
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        body = await request.body()
        if len(body) > MAX_BODY:
            return JSONResponse({"detail": "request too large"}, status_code=413)
        headers = {k: v for k, v in request.headers.items() if k not in DROPPED_HEADERS}
        try:
            reply = await request.app.state.client.post(
                request.url.path, content=body, headers=headers
            )
        except httpx.TransportError:
            return JSONResponse({"detail": "SuperLink unavailable"}, status_code=503)
        kept = {k: v for k, v in reply.headers.items() if k not in DROPPED_HEADERS}
        kept.pop("content-encoding", None)  # httpx already decoded the body
        return Response(reply.content, status_code=reply.status_code, headers=kept)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/proxy-health", health, methods=["GET"]),
            Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ],
        lifespan=lifespan,
    )


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT the SuperNodes dial")
    parser.add_argument("--upstream", required=True, help="the SuperLink's HOST:PORT")
    parser.add_argument("--ca", type=Path, required=True, help="CA certificate (ca.pem)")
    parser.add_argument("--certfile", type=Path, required=True, help="server certificate")
    parser.add_argument("--keyfile", type=Path, required=True, help="server private key")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    routes = fleet_routes()
    print(f"forwarding {len(routes)} Fleet API routes to {args.upstream}", flush=True)
    uvicorn.run(
        create_app(args.upstream, args.ca, routes),
        host=host,
        port=int(port),
        ssl_certfile=str(args.certfile),
        ssl_keyfile=str(args.keyfile),
        log_level="info",
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
