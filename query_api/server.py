"""``topology serve``: the read API on uvicorn (adr/0009).

uvloop and httptools are used when installed (they are dependencies). On SIGINT or
SIGTERM, long-polling requests are released at once (they answer 304), so
shutting down does not wait out their ``wait``. TLS and mutual TLS when configured
(``TOPOLOGY_TLS_*``, ``query_api/tls.py``, adr/0021).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from topology_store.query_api.app import BesideDoor, create_app
from topology_store.query_api.snapshot_api import RouterSync
from topology_store.query_api.sync_middleware import RouterSyncMiddleware
from topology_store.query_api.tls import uvicorn_tls, with_client_certificates
from topology_store.query_api.uvicorn_fast_path import protocol_for
from topology_store.runtime.collector import freeze_startup_heap
from topology_store.runtime.http_server import GracefulServer
from topology_store.runtime.settings import Settings

log = logging.getLogger(__name__)


class _Server(GracefulServer):
    def __init__(self, config: uvicorn.Config, sync: RouterSync) -> None:
        super().__init__(config)
        self._sync = sync

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._sync.close_soon()
        super().handle_exit(sig, frame)


def serve(settings: Settings, beside: Sequence[BesideDoor] = ()) -> None:
    """The read API; ``beside``: other doors run in its lifespan (the gRPC door, adr/0021)."""
    app = create_app(settings, beside=beside)
    sync: RouterSync = app.state.sync
    if sync.authorizer.configured == 0:
        log.warning("no API tokens configured (TOPOLOGY_API_TOKENS): every routing-data request gets 401")
    http: Any = protocol_for(sync) or "auto"  # 304 revalidations below ASGI (query_api/uvicorn_fast_path.py)
    if settings.tls_client_ca:  # mutual TLS: the routes learn the client certificate's cell (query_api/tls.py)
        http = with_client_certificates(http if not isinstance(http, str) else AutoHTTPProtocol)
    config = uvicorn.Config(
        # The fast path also in front of Starlette itself: revalidations skip its
        # request setup and error middleware (the copy inside guards the routes when
        # the app is used without this wrapper).
        RouterSyncMiddleware(app, sync),
        host=settings.api_host,
        port=settings.api_port,
        log_level="info",
        log_config=None,  # uvicorn's records go to the JSON, redacting handler of runtime/logs.py
        access_log=settings.api_access_log,
        timeout_graceful_shutdown=5,
        # Clients' addresses are never logged or used, so X-Forwarded-For parsing
        # would only cost time on every request; neither is a Server header needed.
        proxy_headers=False,
        server_header=False,
        http=http,
        **uvicorn_tls(settings),  # TOPOLOGY_TLS_CERT/KEY/CLIENT_CA (adr/0021)
    )
    # The app is built and every module imported: out of the collector's view, so a full
    # collection no longer stalls the event loop for tens of ms (runtime/collector.py).
    freeze_startup_heap()
    _Server(config, sync).run()
