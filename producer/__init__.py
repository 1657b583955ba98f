"""The producing side: validate, encode and publish events; report only what the broker acknowledged."""

from topology_store.producer.publisher import EventPublisher, Published, PublishFailed

__all__ = ["EventPublisher", "Published", "PublishFailed"]
