"""TLS and mutual TLS on the HTTP API's port (adr/0021).

``TOPOLOGY_TLS_CERT`` + ``TOPOLOGY_TLS_KEY``: uvicorn serves HTTPS only. With
``TOPOLOGY_TLS_CLIENT_CA`` the handshake requires a client certificate signed by that CA
(no certificate, or one from another CA: the handshake fails, no HTTP answer at all).

The verified certificate's cell binding (:func:`topology_store.core.access.certificate_binding`
of its URI SANs) reaches the routes through the ASGI scope's ``state``: uvicorn copies its
protocol's ``app_state`` into every request's ``scope["state"]``, so the protocol subclass
of :func:`with_client_certificates` puts the binding into a per-connection copy of it when
the connection is made (uvicorn gives the ASGI app no other access to the peer
certificate). :func:`topology_store.query_api.auth.denied` reads it from there.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from topology_store.core.access import certificate_binding
from topology_store.query_api.auth import CLIENT_CERTIFICATE
from topology_store.runtime.settings import Settings


def uvicorn_tls(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config's TLS keywords for the settings (none without a certificate)."""
    if not settings.tls_cert:
        return {}
    options: dict[str, Any] = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
    if settings.tls_client_ca:
        options |= {"ssl_ca_certs": settings.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def peer_uris(peercert: dict[str, Any] | None) -> list[str]:
    """The URI subject alternative names of ``SSLObject.getpeercert()``'s answer."""
    if not peercert:
        return []
    return [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]


def with_client_certificates(protocol: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """``protocol`` (a uvicorn HTTP protocol class), also handing each request the binding of
    its connection's verified client certificate (``scope["state"][CLIENT_CERTIFICATE]``)."""

    class ClientCertificateProtocol(protocol):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            peercert = transport.get_extra_info("peercert")
            if peercert:  # only a certificate the handshake verified (CERT_REQUIRED) is here
                self.app_state = {**self.app_state, CLIENT_CERTIFICATE: certificate_binding(peer_uris(peercert))}

    ClientCertificateProtocol.__name__ = f"ClientCertificate{protocol.__name__}"
    return ClientCertificateProtocol
