"""The contract, the bottom layer: the Avro event schemas (``*.avsc``), their wire codec,
the pydantic edge models, and the router sync protocol's wire format (adr/0001, adr/0009).

The ``.avsc`` files are the single definition of every event. Everything in this
package is derived from them (the codec, the registry of writer schemas) or is
tested against them (the pydantic models, see ``tests/unit/test_contract.py``).

- ``registry``       loads the ``.avsc`` files; writer schemas by fingerprint (``history/``).
- ``codec``          Avro single-object encoding, and the event-type header.
- ``models``         pydantic models of the events, for validation at the edges.
- ``compatibility``  every schema version stays readable, both directions; ``fingerprints.json``.
- ``router_sync``    the router sync protocol's wire details, shared by the read API and the
                     router client.
- ``generated``      GitLab's Topology Service contract as protobuf and gRPC Python code,
                     generated from ``proto/`` (never edited; adr/0021): both doors read it.
"""
