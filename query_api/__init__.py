"""The read API: versioned snapshots for edge routers, point lookups, and the claims door
(adr/0009).

Resources, one module each:

- ``snapshot_api``      ``GET /v1/snapshot`` (full snapshot, delta, long-poll) and
                        ``GET /v1/classify``: the one snapshot endpoint and its 304
                        decision, the version headers, the error answer in bytes.
- ``cells_api``         ``GET /v1/cells`` and ``GET /v1/cells/{cell_id}``.
- ``gitlab_api``        ``POST /v1/classify``: GitLab's Classify over REST (its HTTP Router's
                        call), protobuf's JSON mapping, the gRPC door's decision.
- ``audit_api``         ``GET /v1/audit/history``, and reading a key's history.
- ``health_api``        ``/healthz``, ``/readyz``, ``/metrics``.
- ``claims_api``        the claims door: claim requests with a synchronous answer over the
                        claims service, claim and owner lookups.
- ``decisions``         waits for the projector's decisions (the claims service's source).

In front of them, cheaper doors to the same snapshot endpoint:

- ``sync_middleware``   plain ASGI: the token check of routing data, ``GET /v1/snapshot``.
- ``uvicorn_fast_path`` plain 304 revalidations in uvicorn's HTTP protocol, below ASGI.

Underneath:

- ``snapshot``          one consistent snapshot per version, kept fresh by LISTEN/NOTIFY
                        and the change log; deltas and their cache.
- ``encodings``         serialize once, compress once, per version.
- ``auth``              tokens and scopes, cell-bound credentials; 401/403 answers and
                        their OpenAPI description.
- ``tls``               TLS and mutual TLS on the HTTP port; the client certificate's cell.
- ``documents``         the response documents (pydantic, for validation and OpenAPI).
- ``contract``          the request side of the contract: strict integers and UUIDs, the
                        claim value formats by bucket, the document's links and exact bounds.
- ``errors``            the one error document; exception handlers, request limits, and the
                        errors the OpenAPI document declares.
- ``metrics``           Prometheus metrics.
- ``state``             what the lifespan opens for the routes.
- ``app``               the app: resources, middleware, lifespan.
- ``server``            ``topology serve``: the app on uvicorn.

The router sync wire details shared with the router client are ``schemas/router_sync.py``.
"""
