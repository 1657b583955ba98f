"""Creates the topics the system needs, refuses topics laid out wrongly, and checks (or
fixes) the claim-requests topic's log-time stamping where the broker applies topic
configs. What the broker can do is asked, not assumed: ``broker_capabilities`` (adr/0016)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, UnknownTopicOrPartitionError, for_code
from aiokafka.protocol.admin import ApiVersionRequest

from topology_store.runtime.settings import Settings

log = logging.getLogger(__name__)

#: Requests are decided by log time (adr/0010): the broker's clock stamps them, not each producer's.
TIMESTAMP_TYPE = "message.timestamp.type"
LOG_APPEND_TIME = "LogAppendTime"
#: Kafka protocol API keys the capability check looks for.
ALTER_CONFIGS_API = 33
#: DescribeConfigs' config_source of a value set on the topic itself.
DYNAMIC_TOPIC_CONFIG = 1


class TopicLayoutError(RuntimeError):
    """An existing topic is laid out (partitions, timestamp type) in a way the system cannot run on."""


@dataclass(frozen=True)
class BrokerCapabilities:
    """What the broker does, as it answered ApiVersions (adr/0016).

    ``topic_configs``: it serves AlterConfigs, so it keeps and applies per-topic configs
    such as ``message.timestamp.type`` (Apache Kafka). The embedded Tansu broker answers
    DescribeConfigs with the configs a topic was created with, but applies none of them
    and cannot alter them (no AlterConfigs): its records keep the producer's timestamp.
    """

    api_versions: dict[int, tuple[int, int]]

    @property
    def topic_configs(self) -> bool:
        return ALTER_CONFIGS_API in self.api_versions


async def broker_capabilities(admin: AIOKafkaAdminClient) -> BrokerCapabilities:
    """Ask one broker of a started admin client which requests it serves."""
    client = admin._client  # aiokafka exposes no ApiVersions call of its own
    node = client.get_random_node()
    if node is None:
        await client.force_metadata_update()
        node = client.get_random_node()
    response = await client.send(node, ApiVersionRequest())
    return BrokerCapabilities({key: (low, high) for key, low, high in response.api_versions})


async def ensure_topics(settings: Settings) -> BrokerCapabilities:
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
            configs = {settings.claim_requests_topic: {TIMESTAMP_TYPE: LOG_APPEND_TIME}}
            response = await admin.create_topics(
                [
                    NewTopic(name, wanted[name], settings.replication_factor, topic_configs=configs.get(name, {}))
                    for name in missing
                ]
            )
            created = []
            # aiokafka hands back the per-topic outcomes rather than raising them.
            for topic, error_code, *message in response.topic_errors:
                if error_code == TopicAlreadyExistsError.errno:
                    continue  # another process won the race
                if error_code:
                    error = for_code(error_code)
                    detail = f"creating {topic} failed: {error.__name__} {message[0] if message and message[0] else ''}"
                    # Retriable ones (a controller moving, a timeout) are the broker's to fix, and
                    # callers retry KafkaErrors; the rest (a replication factor above the broker
                    # count, a policy) need an operator.
                    raise error(detail.rstrip()) if error.retriable else TopicLayoutError(detail.rstrip())
                created.append(topic)
            if created:
                log.info("created topics %s", created)
        single = [settings.cells_topic, settings.claim_decisions_topic]
        for described in await admin.describe_topics(single):
            partitions = len(described["partitions"])
            if partitions and partitions != 1:
                raise TopicLayoutError(
                    f"{described['topic']} has {partitions} partitions; it must have exactly 1 so that "
                    "its events are totally ordered (adr/0004, adr/0010)"
                )
        capabilities = await broker_capabilities(admin)
        if capabilities.topic_configs:
            await _ensure_log_append_time(admin, settings.claim_requests_topic)
        else:  # once per process start: each process calls this once, before it runs
            log.warning(
                "the broker at %s does not apply topic configs (no AlterConfigs; the embedded Tansu broker): "
                "%s keeps the producers' timestamps instead of %s, so lease times follow the producers' "
                "clocks (adr/0010, adr/0016)", settings.kafka_bootstrap, settings.claim_requests_topic, LOG_APPEND_TIME,
            )
        return capabilities
    finally:
        await admin.close()


async def _topic_config(admin: AIOKafkaAdminClient, topic: str) -> list[tuple[str, str | None, int, bool]]:
    """(name, value, source, sensitive) of every config of ``topic``. A topic created a
    moment ago may not have reached the broker's metadata yet: asked again for a while."""
    for attempt in range(50):
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        [(error_code, error_message, _, _, entries)] = response.resources
        if error_code != UnknownTopicOrPartitionError.errno or attempt == 49:
            break
        await asyncio.sleep(0.1)
    if error_code:
        raise for_code(error_code)(f"describing {topic}'s config: {error_message}")
    # DescribeConfigs v1+: (name, value, read_only, config_source, is_sensitive, synonyms...)
    return [(entry[0], entry[1], entry[3], entry[4]) for entry in entries]


async def _ensure_log_append_time(admin: AIOKafkaAdminClient, topic: str) -> None:
    """The claim-requests topic must stamp records with the broker's clock (adr/0010). A
    topic created elsewhere with CreateTime is switched to LogAppendTime (records written
    from then on get the broker's time), keeping every other config set on the topic."""
    entries = await _topic_config(admin, topic)
    current = next((value for name, value, _, _ in entries if name == TIMESTAMP_TYPE), None)
    if current == LOG_APPEND_TIME:
        return
    own = {name: value for name, value, source, _ in entries if source == DYNAMIC_TOPIC_CONFIG}
    hidden = [name for name, value, source, sensitive in entries
              if source == DYNAMIC_TOPIC_CONFIG and (sensitive or value is None)]
    if hidden:
        # AlterConfigs replaces the topic's whole set; a value the broker hides would be lost.
        raise TopicLayoutError(
            f"{topic} has {TIMESTAMP_TYPE}={current}; it must be {LOG_APPEND_TIME} (adr/0010). Set it with "
            f"kafka-configs.sh --alter --entity-type topics --entity-name {topic} "
            f"--add-config {TIMESTAMP_TYPE}={LOG_APPEND_TIME} (not changed here: {', '.join(hidden)} cannot be read back)"
        )
    log.warning("%s has %s=%s; switching it to %s (adr/0010: requests are decided by log time)",
                topic, TIMESTAMP_TYPE, current, LOG_APPEND_TIME)
    [response] = await admin.alter_configs(
        [ConfigResource(ConfigResourceType.TOPIC, topic, configs={**own, TIMESTAMP_TYPE: LOG_APPEND_TIME})]
    )
    for error_code, error_message, _, _ in response.resources:
        if error_code:
            raise TopicLayoutError(
                f"{topic} has {TIMESTAMP_TYPE}={current} and switching it to {LOG_APPEND_TIME} failed: "
                f"{for_code(error_code).__name__} {error_message or ''}".rstrip()
            )
    # The controller accepted it; the broker applies it once the change reaches its metadata.
    for _ in range(100):
        after = next((value for name, value, _, _ in await _topic_config(admin, topic) if name == TIMESTAMP_TYPE), None)
        if after == LOG_APPEND_TIME:
            return
        await asyncio.sleep(0.05)
    raise TopicLayoutError(f"{topic} still has {TIMESTAMP_TYPE}={after} after switching it to {LOG_APPEND_TIME}")
