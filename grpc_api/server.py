"""The gRPC server of ``topology serve`` (adr/0021): GitLab's Topology Service contract on
its own port (``TOPOLOGY_GRPC_PORT``), in the HTTP API's process and event loop, over the
snapshot that process holds.

Beside GitLab's services (:mod:`topology_store.grpc_api.services`) it serves
``grpc.health.v1.Health`` (what Rails checks: service ``""``, and each fully served service
by name; SERVING once a snapshot is loaded, NOT_SERVING before and while shutting down)
and server reflection (``grpcurl list``).

Credentials: the HTTP API's bearer tokens, sent as ``authorization: Bearer <token>``
metadata (Rails' topology service client adds configured metadata to every call); cells,
classification and GetCells need the ``snapshot:read`` scope, as the routing data does over
HTTP. Health checking, GitLab's probes and reflection need none. No credential:
UNAUTHENTICATED; a token without the scope: PERMISSION_DENIED. TLS and mutual TLS with
``TOPOLOGY_TLS_*`` (:mod:`topology_store.grpc_api.access`): under mutual TLS the verified
client certificate is a credential of its own, and per-cell authorization applies to both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from topology_store.grpc_api.access import TokenBinding, authorization, server_credentials
from sqlalchemy.ext.asyncio import AsyncEngine

from topology_store.grpc_api.services import SERVED, add_services
from topology_store.runtime.settings import Settings
from topology_store.schemas.router_sync import CLAIMS_READ, CLAIMS_WRITE, SNAPSHOT_READ
from topology_store.service.claims import ClaimsService
from topology_store.service.gitlab_classify import SnapshotSource

log = logging.getLogger(__name__)

# (authorization header or None, scope) -> None when allowed, else (HTTP status, code, message):
# the HTTP API's check (query_api.auth.Authorizer.check), handed in by the command.
Authorize = Callable[[bytes | None, str], tuple[int, str, str] | None]

OPEN_SERVICES = (
    health.SERVICE_NAME,
    reflection.SERVICE_NAME,
    "gitlab.cells.topology_service.HealthService",
)
HEALTH_POLL_S = 0.25


_CLAIMS = "/gitlab.cells.topology_service.claims.v1.ClaimService/"
#: The scope each RPC needs beyond ``snapshot:read`` (the HTTP door's claims scopes).
METHOD_SCOPES = {
    **{_CLAIMS + rpc: CLAIMS_WRITE for rpc in ("BeginUpdate", "CommitUpdate", "RollbackUpdate")},
    **{_CLAIMS + rpc: CLAIMS_READ for rpc in ("ListLeases", "ListRecords", "GetRecord")},
}


class BearerTokens(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses an RPC outside :data:`OPEN_SERVICES` without a token holding its scope
    (``snapshot:read``; ClaimService's writes ``claims:write``, its reads ``claims:read``)."""

    def __init__(self, authorize: Authorize, mutual_tls: bool = False) -> None:
        self._authorize = authorize
        self._mutual_tls = mutual_tls

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        service = details.method.lstrip("/").split("/", 1)[0]
        if service in OPEN_SERVICES:
            return await continuation(details)
        header = authorization(details.invocation_metadata)
        if header is None and self._mutual_tls:  # the handshake verified the client's certificate
            return await continuation(details)
        refused = self._authorize(header, METHOD_SCOPES.get(details.method, SNAPSHOT_READ))
        if refused is None:
            return await continuation(details)
        status, _, message = refused
        code = grpc.StatusCode.UNAUTHENTICATED if status == 401 else grpc.StatusCode.PERMISSION_DENIED

        async def deny(request: bytes, context: grpc.aio.ServicerContext) -> None:
            await context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(deny)  # every guarded RPC is unary


async def _report(servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *SERVED):
        await servicer.set(name, status)


async def _follow_readiness(servicer: health.aio.HealthServicer, snapshots: SnapshotSource, serving: bool) -> None:
    """SERVING while a snapshot is loaded, NOT_SERVING before."""
    while True:
        await asyncio.sleep(HEALTH_POLL_S)
        now = snapshots.current is not None
        if now != serving:
            await _report(servicer, now)
            serving = now


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@asynccontextmanager
async def grpc_door(settings: Settings, snapshots: SnapshotSource, authorize: Authorize,
                    token_binding: TokenBinding | None = None, claims: ClaimsService | None = None,
                    engine: AsyncEngine | None = None) -> AsyncIterator[str]:
    """The server on ``TOPOLOGY_API_HOST:TOPOLOGY_GRPC_PORT`` while the block runs; yields its address.
    ``token_binding``: the cell a bearer token is bound to (``Authorizer.binding``); ``claims``
    and ``engine``: the HTTP API's claims service and database, which ClaimService shares."""
    credentials = server_credentials(settings)
    server = grpc.aio.server(
        interceptors=[BearerTokens(authorize, mutual_tls=bool(settings.tls_client_ca))],
        options=[
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a second server sharing it
            ("grpc.max_receive_message_length", settings.api_max_body_bytes),  # the HTTP API's body limit
        ],
    )
    add_services(server, snapshots, settings, token_binding, claims, engine)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVED, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                        server)
    address = listen_address(settings.api_host, settings.grpc_port)
    try:
        if credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise RuntimeError(f"gRPC: cannot listen on {address} (TOPOLOGY_GRPC_PORT): {exc}") from None
    serving = snapshots.current is not None
    await _report(health_servicer, serving)  # before the first call can come in
    await server.start()
    follower = asyncio.create_task(_follow_readiness(health_servicer, snapshots, serving), name="grpc-health")
    log.info("gRPC (GitLab's Topology Service contract) on %s (%s)", address,
             "mutual TLS" if settings.tls_client_ca else "TLS" if credentials is not None else "plain TCP")
    try:
        yield address
    finally:
        follower.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=2)
