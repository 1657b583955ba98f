"""The gRPC door: GitLab's Topology Service contract (adr/0021), served by ``topology serve``
on ``TOPOLOGY_GRPC_PORT`` beside the HTTP API, over the same snapshot.

- ``server``     the grpc.aio server: GitLab's services, health checking, reflection, tokens.
- ``services``   the servicers: cells, classification, GitLab's probes, and ClaimService
                 (its writes through the claims service, adr/0022).
- ``records``    what ClaimService reads from the projection: leases, records, attempts.
- ``claim_owners`` which cell holds a committed claim, for Classify by claims other than routes.
- ``access``     TLS and mutual TLS on the port; per-cell authorization of the claim RPCs.
- ``generate``   regenerates ``schemas/generated/`` from the ``.proto`` files in ``proto/``.

GitLab's Classify and our cells in GitLab's shape are shared with the HTTP door:
``service/gitlab_classify.py``, ``service/gitlab_cells.py``; GitLab's claims mapped onto
our commands: ``service/gitlab_claims.py``. The contract as read from
GitLab: docs/gitlab-contract.md.
"""
