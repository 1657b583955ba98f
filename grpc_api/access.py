"""TLS, mutual TLS and per-cell authorization on the gRPC port (adr/0021).

``TOPOLOGY_TLS_CERT`` + ``TOPOLOGY_TLS_KEY``: the port speaks TLS only; with
``TOPOLOGY_TLS_CLIENT_CA`` the handshake requires a client certificate that CA signed (no
certificate or another CA's: the handshake fails and the client sees UNAVAILABLE; no RPC
runs). Under mutual TLS the verified certificate authenticates a call on its own (GitLab's
Rails client sends none of our tokens); a bearer token sent as well must still be valid.

Per-cell authorization (GitLab's ``RULE_ALLOW_MATCHING_CELL_ONLY`` / ``RULE_ALLOW_ANY_ADMIN``):
:class:`CellAccess` gathers the bindings of the call's credentials (the token's, the
certificate's URI SANs from ``context.auth_context()``) and asks
:func:`topology_store.core.access.refusal` about the cell the request names (GitLab's int64
id, mapped to our name); a refusal is PERMISSION_DENIED, before the RPC does anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from topology_store.core.access import Binding, certificate_binding, refusal
from topology_store.runtime.settings import Settings
from topology_store.service.gitlab_classify import Refusal, Tables

# The bearer token's binding (``query_api.auth.Authorizer.binding``): None when absent or unknown.
TokenBinding = Callable[[bytes | None], Binding | None]


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise RuntimeError(f"gRPC: cannot read {setting} {path}: {exc.strerror}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The port's TLS credentials from ``TOPOLOGY_TLS_*``; None: plain TCP."""
    if not settings.tls_cert:
        return None
    pair = (_read(settings.tls_key, "TOPOLOGY_TLS_KEY"), _read(settings.tls_cert, "TOPOLOGY_TLS_CERT"))
    client_ca = _read(settings.tls_client_ca, "TOPOLOGY_TLS_CLIENT_CA") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def authorization(metadata: Sequence[tuple[str, str | bytes]] | None) -> bytes | None:
    """The call's ``authorization`` metadata, as the HTTP header's bytes."""
    presented = next((value for key, value in metadata or () if key == "authorization"), None)
    return presented.encode("latin-1") if isinstance(presented, str) else presented


def certificate(context: grpc.aio.ServicerContext) -> Binding | None:
    """The binding of the call's verified client certificate; None without one."""
    auth = context.auth_context()
    if not auth.get("x509_pem_cert"):
        return None
    return certificate_binding([uri.decode() for uri in auth.get("peer_uri", ())])


class CellAccess:
    """May this call's credentials act for the cell its request names?"""

    def __init__(self, tables: Tables, token_binding: TokenBinding | None) -> None:
        self._tables = tables
        self._token_binding = token_binding

    def _bindings(self, context: grpc.aio.ServicerContext) -> list[Binding]:
        bindings = []
        if self._token_binding is not None:
            token = self._token_binding(authorization(context.invocation_metadata()))
            if token is not None:
                bindings.append(token)
        if (cert := certificate(context)) is not None:
            bindings.append(cert)
        return bindings

    def require_cell(self, context: grpc.aio.ServicerContext, cell_number: int) -> None:
        """Raise PERMISSION_DENIED unless every credential may act for GitLab's cell ``cell_number``."""
        bindings = self._bindings(context)
        if not bindings:  # nothing binds the call (the interceptor let it in): nothing to refuse
            return
        _, numbers = self._tables.current()
        cell = numbers.by_number.get(cell_number, f"cell id {cell_number}")
        if (reason := refusal(bindings, cell)) is not None:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, reason)

    def require_admin(self, context: grpc.aio.ServicerContext) -> None:
        """Raise PERMISSION_DENIED unless every credential is an admin's (``RULE_ALLOW_ANY_ADMIN``)."""
        for binding in self._bindings(context):
            if not binding.admin:
                raise Refusal(grpc.StatusCode.PERMISSION_DENIED,
                              f"the {binding.credential} is not an admin credential (this RPC is admin only)")
