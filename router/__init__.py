"""The edge router's side of the sync protocol (adr/0009).

- ``client``  :class:`RouterClient` and :class:`RoutingTable`: the table in memory,
  long-poll + deltas, full-snapshot fallback, last-known-good copy on disk.
- ``sidecar`` ``topology router``: the client as a process, answering ``/classify``
  and ``/metrics`` locally.
"""
