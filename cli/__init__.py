"""The ``topology`` command, the top layer: every subcommand, and the embedded dev stack.
Nothing imports this package.

- ``main``      the parser and the dispatch of every subcommand.
- ``audit``     ``topology audit history``, ``replay``, ``rebuild``, ``verify``, ``export``.
- ``dlq``       ``topology dlq list | show | replay | discard``.
- ``up``        ``topology up``: the whole stack in one command.
- ``devstack``  the embedded servers behind ``topology up`` and the test fallback.
- ``demo``      the demo topology of ``topology up --demo``.
"""
