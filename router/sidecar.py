"""``topology router``: the router client as an edge router's sidecar process.

It keeps the routing table in sync (:class:`router.client.RouterClient`) and
answers, on ``127.0.0.1:TOPOLOGY_ROUTER_PORT``:

- ``GET /classify?type=ROUTE&value=gitlab-org/gitlab`` from memory (the read
  API's ``/v1/classify`` document; 404 unknown; 503 before any table is held);
- ``GET /metrics`` (its version, the server's, the lag, the data's age);
- ``GET /healthz`` and ``GET /readyz``: ready once a table is held, from the API
  or from the last-known-good file, with ``last_heard_s`` (since the API last
  answered); 503 ``stale`` when the API has been silent longer than
  ``TOPOLOGY_ROUTER_STALE_AFTER_S`` (frozen, or unreachable), ``/classify`` still
  answering from the table held (``RouterClient.readiness``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from urllib.parse import parse_qs

import orjson
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from topology_store.router.client import RouterClient
from topology_store.runtime.http_server import GracefulServer
from topology_store.runtime.settings import Settings
from topology_store.schemas.router_sync import error_document

log = logging.getLogger(__name__)



def sidecar_app(client: RouterClient) -> ASGIApp:
    stop = asyncio.Event()

    async def respond(send: Send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            runner: asyncio.Task[None] | None = None
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    runner = asyncio.create_task(client.run(stop), name="router-sync")
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    stop.set()
                    if runner is not None:
                        await runner
                    await client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/classify":
            query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode("latin-1")).items()}
            if "type" not in query or "value" not in query:
                await respond(send, 400, orjson.dumps(
                    error_document("bad_parameter", "type and value are required")))
                return
            if client.table is None:
                await respond(send, 503, orjson.dumps(
                    error_document("not_loaded", "no routing table yet")))
                return
            try:
                answer = client.classify(query["type"], query["value"])
            except ValueError as exc:
                await respond(send, 400, orjson.dumps(error_document("bad_type", str(exc))))
                return
            if answer is None:
                await respond(send, 404, orjson.dumps(
                    error_document("not_found", f"nothing owns {query['value']!r}")))
                return
            await respond(send, 200, orjson.dumps(answer))
        elif path == "/metrics":
            await respond(send, 200, generate_latest(client.metrics.registry), CONTENT_TYPE_LATEST.encode())
        elif path == "/healthz":
            await respond(send, 200, b'{"status":"ok"}')
        elif path == "/readyz":
            status, document = client.readiness()
            await respond(send, status, orjson.dumps(document))
        else:
            await respond(send, 404, orjson.dumps(error_document("not_found", "no such path")))

    return app


def run_router(settings: Settings, api_urls: list[str], token: str, state_file: Path, port: int) -> None:
    client = RouterClient(api_urls, token, state_file=state_file, wait_s=settings.router_wait_s,
                          stale_after_s=settings.router_stale_after_s)
    log.info("router sidecar: API %s, state file %s, local port %d", ", ".join(api_urls), state_file, port)
    config = uvicorn.Config(sidecar_app(client), host="127.0.0.1", port=port, log_level="warning",
                            log_config=None, access_log=False, lifespan="on")  # runtime/logs.py handles records
    GracefulServer(config).run()


def token_from(settings: Settings, token_file: str | None) -> str:
    if token_file:
        return Path(token_file).read_text(encoding="utf-8").strip()
    return settings.router_token or os.environ.get("TOPOLOGY_ROUTER_TOKEN", "")
