"""The read API: versioned snapshots for edge routers, and point lookups.

- ``snapshot``      one consistent snapshot per version, kept fresh by LISTEN/NOTIFY and
                    the change log; deltas.
- ``sync``          the router sync protocol (adr/0009): full snapshots, deltas, long-poll,
                    negotiation, bearer tokens, classification; the ASGI fast path.
- ``fast_protocol`` 304 revalidations answered in uvicorn's protocol, below ASGI.
- ``protocol``      wire details shared with the router client (``router/``).
- ``encodings``     serialize once, compress once, per version.
- ``auth``          tokens and scopes.
- ``models``        the response documents (pydantic, for validation and OpenAPI).
- ``errors``        the one error document; exception handlers, request limits, and the
                    errors the OpenAPI document declares.
- ``app``           the HTTP routes (FastAPI on uvicorn); ``server`` runs it.
"""
