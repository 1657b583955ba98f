"""The pure core (adr/0007): what an event does, as plain functions over plain data.

No I/O, no framework, no clock: the shells (``projector``, ``service``) load rows, call
these functions and write back what they return.

- ``cells``   the cell life cycle: registration, updates, state transitions (adr/0004).
- ``claims``  the claim decider: ``decide`` a request against the registry, ``evolve``
              the registry by a decision (adr/0010).
- ``fold``    the one fold of the log, used by the live projector, replay and rebuild.
- ``audit``   the audit index's keys: what an event touched, what a question names.
- ``access``  per-cell authorization: may these credentials act for this cell (adr/0021).
"""
