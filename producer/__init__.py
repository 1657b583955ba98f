"""The producing side: validate, encode and publish events; report only what the broker acknowledged."""

from producer.publisher import EventPublisher, Published, PublishFailed

__all__ = ["EventPublisher", "Published", "PublishFailed"]
