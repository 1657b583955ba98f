"""The ``topology`` command, the top layer: every subcommand, and the servers of the dev
stack. Nothing imports this package.

- ``main``          the parser, the one read of the configuration, and the small subcommands
                    (migrate, topics, emit, project, relay, serve, router, up).
- ``claim``         ``topology claim ...``: a door of the claims service.
- ``audit``         ``topology audit history``, ``replay``, ``rebuild``, ``verify``, ``export``.
- ``dlq``           ``topology dlq list | show | replay | discard``.
- ``compact``       ``topology compact``: retention (adr/0020).
- ``schemas``       ``topology schemas check``.
- ``up``            ``topology up``: the whole stack in one command.
- ``demo``          the demo topology of ``topology up --demo``.
- ``devpki``        the development CA and certificates of ``topology up`` (mutual TLS).
- ``devstack``      the embedded servers behind ``topology up`` and the test fallback (Tansu,
                    embedded PostgreSQL).
- ``watchdog``      stops the servers and services of ``topology up`` when it dies without doing so.
- ``apache_kafka``  a real Apache Kafka broker on the local JVM (KRaft), for tests and local runs.
"""
