"""The gRPC door: GitLab's Topology Service contract (adr/0021), served by ``topology serve``
on ``TOPOLOGY_GRPC_PORT`` beside the HTTP API, over the same snapshot.

- ``server``     the grpc.aio server: GitLab's services, health checking, reflection, tokens.
- ``services``   the servicers: cells, classification, GetCells, GitLab's probes.
- ``classify``   GitLab's Classify over a snapshot, through the read API's classification.
- ``cells``      our cells in GitLab's shape: numeric ids, ``host:port``, the first cell.
- ``generate``   regenerates ``schemas/generated/`` from the ``.proto`` files in ``proto/``.

The contract as read from GitLab: docs/gitlab-contract.md.
"""
