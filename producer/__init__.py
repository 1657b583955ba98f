"""The producing side: validate, encode and publish events; report only what the broker
acknowledged (adr/0001, adr/0008).

- ``publisher``      :class:`EventPublisher`: acks=all, key = the event's partition key.
- ``emit``           ``topology emit``: events given as JSON, one result line each.
- ``outbox``         the reference transactional outbox writer (``outbox.sql``).
- ``relay``          ``topology relay``: publishes an outbox to Kafka, in order.
- ``relay_metrics``  the relay's Prometheus metrics.
"""

from topology_store.producer.publisher import EventPublisher, Published, PublishFailed

__all__ = ["EventPublisher", "Published", "PublishFailed"]
