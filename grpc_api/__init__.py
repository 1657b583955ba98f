"""The gRPC door: GitLab's Topology Service contract (adr/0021).

- ``generate``   regenerates ``generated/`` from the ``.proto`` files in ``proto/``.
- ``generated``  the protobuf and gRPC Python code (generated; never edited).
"""
