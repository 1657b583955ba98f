"""The application service layer (adr/0007, adr/0015): what every door (HTTP, the CLI, a
gRPC door) calls alike. No I/O of its own: the adapters it needs come in as ports.

- ``claims``    :class:`ClaimsService`: ``submit(command)`` publishes a claim command and
                answers with the projector's decision.
- ``admission`` admission control: how many decisions are awaited and how old the oldest
                is; past the budget new requests are refused at once (adr/0018).
- ``commands``  the claim commands, built in one place for every door.
- ``gitlab_classify``  GitLab's Classify over a snapshot (adr/0021): the one decision the gRPC
                door and ``POST /v1/classify`` both answer with; the cells' numbers per snapshot.
- ``gitlab_cells``     our cells in GitLab's shape: numeric ids, ``host:port``, the first cell.
- ``gitlab_claims``    GitLab's ClaimService onto our claim commands and back (adr/0022):
                buckets, records, leases, status codes, a BeginUpdate's request id.
- ``refusals``         a GitLab request answered with another gRPC status than OK.
"""
