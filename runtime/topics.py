"""Creates the topics the system needs, and refuses to run on topics laid out wrongly."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from topology_store.runtime.settings import Settings

log = logging.getLogger(__name__)


class TopicLayoutError(RuntimeError):
    """An existing topic has a partition count the system cannot run on."""


async def ensure_topics(settings: Settings) -> None:
    wanted = {
        settings.cells_topic: settings.cells_partitions,
        settings.claims_topic: settings.claims_partitions,
        settings.claim_requests_topic: settings.claim_requests_partitions,
        settings.claim_decisions_topic: settings.claim_decisions_partitions,
    }
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if missing:
            try:
                # Requests are decided by log time (adr/0010): let the broker's clock,
                # not each producer's, stamp them. (The embedded broker ignores it.)
                configs = {settings.claim_requests_topic: {"message.timestamp.type": "LogAppendTime"}}
                await admin.create_topics(
                    [
                        NewTopic(name, wanted[name], settings.replication_factor, topic_configs=configs.get(name, {}))
                        for name in missing
                    ]
                )
                log.info("created topics %s", missing)
            except TopicAlreadyExistsError:
                pass  # another process won the race
        single = [settings.cells_topic, settings.claim_decisions_topic]
        for described in await admin.describe_topics(single):
            partitions = len(described["partitions"])
            if partitions and partitions != 1:
                raise TopicLayoutError(
                    f"{described['topic']} has {partitions} partitions; it must have exactly 1 so that "
                    "its events are totally ordered (adr/0004, adr/0010)"
                )
    finally:
        await admin.close()
