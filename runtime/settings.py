"""All configuration, in one typed object read once from the environment (prefix ``TOPOLOGY_``)."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from topology_store.schemas.models import CELL_EVENT_TYPES, DECISION_EVENT_TYPES, REQUEST_EVENT_TYPES

INT64_MAX = 2**63 - 1


def parse_cell_numbers(raw: str) -> dict[str, int]:
    """``{"cell-1": 1, ...}``: cell names to GitLab's numeric cell ids, each a distinct
    int64 above 0 (adr/0021); ValueError saying what is wrong."""
    if not raw.strip():
        return {}
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(document, dict):
        raise ValueError('must be a JSON object of cell name -> numeric id, e.g. {"cell-1": 1}')  # noqa: TRY004 - pydantic reports ValueError
    owners: dict[int, str] = {}
    for name, number in document.items():
        if isinstance(number, bool) or not isinstance(number, int) or not 0 < number <= INT64_MAX:
            raise ValueError(f"{name!r}: the id must be an integer from 1 to {INT64_MAX}, got {number!r}")
        if number in owners:
            raise ValueError(f"{name!r} and {owners[number]!r} both have id {number}")
        owners[number] = name
    return {name: number for number, name in owners.items()}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOPOLOGY_", extra="ignore", frozen=True)

    # Servers
    kafka_bootstrap: str = Field(default="127.0.0.1:9092", description="Comma-separated host:port list")
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/topology",
        description="libpq URL of the projection database",
    )

    # Topics
    cells_topic: str = "topology.cells"
    claims_topic: str = "topology.claims"
    claim_requests_topic: str = "topology.claim-requests"
    claim_decisions_topic: str = "topology.claim-decisions"
    # `topology topics` creates the claim-requests topic with message.timestamp.type=LogAppendTime
    # and, on a broker that applies topic configs, switches an existing one to it (adr/0010, adr/0016).
    claim_requests_partitions: int = Field(default=8, ge=1)
    claims_partitions: int = Field(default=8, ge=1)
    replication_factor: int = Field(default=1, ge=1)

    # Producer
    producer_idempotence: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="auto: idempotent where the broker grants a producer id (Apache Kafka), plain acks=all "
        "where it refuses InitProducerId (the embedded Tansu broker); on: refuse to start without; off: never "
        "(adr/0016)",
    )
    producer_linger_ms: int = Field(default=5, ge=0)
    producer_request_timeout_ms: int = Field(default=30_000, ge=1000)

    # Projector
    consumer_group: str = "topology-projector"
    batch_max_events: int = Field(default=5000, ge=1)
    batch_wait_ms: int = Field(default=200, ge=0, description="How long the projector's poll waits when nothing is "
                               "buffered (records that arrive end it at once)")
    fetch_max_wait_ms: int = Field(default=20, ge=1, description="How long the broker may park one of the projector's "
                                   "fetches; bounds a claim's wait behind a parked fetch (adr/0018)")
    projector_metrics_port: int = Field(default=9464, ge=0, description="0 disables the projector's /metrics")
    # Reliability (README "Reliability"): how fast a dead member's partitions move, how
    # often the dependencies are probed for /readyz, how long a SIGTERM may take.
    consumer_session_timeout_ms: int = Field(
        default=10_000, ge=1000, description="A member silent this long is dropped and its partitions reassigned; "
        "Apache Kafka refuses values outside group.min/max.session.timeout.ms (6 s to 30 min by default)"
    )
    consumer_heartbeat_interval_ms: int = Field(default=3_000, ge=100, description="Below a third of the session timeout")
    projector_probe_interval_s: float = Field(
        default=5.0, gt=0, description="How often the projector probes the broker and PostgreSQL (/readyz, *_up gauges)"
    )
    shutdown_timeout_s: float = Field(
        default=10.0, gt=0, description="SIGTERM: the current batch may finish this long, then it is abandoned"
    )

    # Claims
    claim_hmac_secret: SecretStr = Field(
        default=SecretStr("insecure-development-secret"),
        description="Keys the HMAC under which e-mails are stored; set a real secret in production",
    )
    lease_tick_interval_s: float = Field(
        default=5.0, gt=0, description="How often a projector publishes a LeaseExpiryTick (log-time clock)"
    )
    decision_wait_s: float = Field(default=5.0, gt=0, le=60, description="How long HTTP claim calls wait")
    # Admission control (adr/0018): past either budget a new begin, destroy, transfer or sequence
    # request is refused at once (HTTP 429, Retry-After); commits and rollbacks are never refused.
    claims_max_in_flight: int = Field(
        default=256, ge=1, description="Claim requests one API process (or CLI) waits on at once before it sheds new ones"
    )
    claims_max_wait_age_ms: int = Field(
        default=250, ge=1, description="Shed new claim requests while the oldest one waiting has waited longer than this "
        "(the monolith gives a claim call 0.2-0.3 s, then retries)"
    )

    # Read API
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0)
    snapshot_poll_interval_s: float = Field(
        default=5.0, gt=0, description="Fallback refresh when no NOTIFY arrives (e.g. after a reconnect)"
    )
    classify_max_age_s: int = Field(
        default=30, ge=0, le=86400, description="Cache-Control max-age of a POST /v1/classify answer (GitLab's HTTP "
        "Router keeps classify answers in its own cache, adr/0021): how long a cell move may go unseen; 0: no-cache"
    )

    # gRPC door (adr/0021): GitLab's Topology Service contract, beside the HTTP API in `topology serve`
    grpc_port: int = Field(
        default=0, ge=0, le=65535, description="Port of the gRPC door `topology serve` opens beside the HTTP API, "
        "on TOPOLOGY_API_HOST; 0 (the default): none. `topology up` opens it on 9095 (or a free port)"
    )
    grpc_lease_ttl_ms: int = Field(
        default=0, ge=0, le=24 * 3600 * 1000, description="Server-side TTL of a lease begun over gRPC, in ms; 0 (the "
        "default, GitLab's model): none, the monolith commits or rolls back every lease it began and reconciles "
        "stale ones with ListLeases; a call may ask for one with x-topology-lease-ttl-ms metadata (adr/0022)"
    )
    grpc_cell_ids: str = Field(
        default="", description='JSON object: cell name -> GitLab\'s numeric cell id (int64 > 0), e.g. {"cell-1": 1}, '
        "for cells whose events recorded no number (a recorded number wins); a cell with neither has the number its "
        "name ends with (cell-7 -> 7, 12 -> 12)"
    )

    # TLS of the HTTP and gRPC doors (adr/0021): both ports, the same files
    tls_cert: str = Field(
        default="", description="PEM certificate (chain) the HTTP API and the gRPC door present; with "
        "TOPOLOGY_TLS_KEY both ports speak TLS only. Empty (the default): plain TCP"
    )
    tls_key: str = Field(default="", description="PEM private key of TOPOLOGY_TLS_CERT")
    tls_client_ca: str = Field(
        default="", description="PEM CA certificate(s): mutual TLS, a client must present a certificate they "
        "signed (its URI SAN topology://cell/<cell id> binds it to a cell; topology://admin: any cell)"
    )

    # Router sync (adr/0009): access tokens, long-poll, change-log retention, compression, router sidecar
    api_tokens: str = Field(
        default="",
        repr=False,
        description='JSON object: bearer token -> list of scopes, e.g. {"s3cr3t": ["snapshot:read"]}; never logged',
    )
    api_tokens_file: str = Field(default="", description="Path of a JSON file of the same shape (merged)")
    api_max_wait_s: float = Field(default=60.0, gt=0, le=3600, description="Upper bound of a long-poll's ?wait=")
    api_access_log: bool = Field(default=False, description="uvicorn access log (one line per request)")
    api_max_body_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Largest request body the read API accepts; larger ones get 413 before being read "
        "(a claim request of 100 claims of 255 characters is about 30 KiB)",
    )
    changelog_keep_versions: int = Field(default=100_000, ge=0, description="Versions the change log keeps; 0: no limit")
    changelog_keep_seconds: float = Field(default=86_400.0, ge=0, description="Age the change log keeps; 0: no limit")
    snapshot_gzip_level: int = Field(default=6, ge=1, le=9)
    snapshot_zstd_level: int = Field(default=3, ge=1, le=19)
    router_api_urls: str = Field(default="http://127.0.0.1:8080", description="Comma-separated read API base URLs")
    router_token: str = Field(default="", repr=False, description="Bearer token of `topology router`; never logged")
    router_state_file: str = Field(default=".topology/router-state.json", description="Last-known-good table")
    router_port: int = Field(default=9466, ge=0, description="`topology router`: port of local /classify, /metrics")
    router_wait_s: float = Field(default=30.0, gt=0, description="Long-poll wait the router asks for")
    router_stale_after_s: float = Field(
        default=60.0, gt=0, description="`topology router`: /readyz turns 503 `stale` when the read API has not "
        "answered for this long; must exceed TOPOLOGY_ROUTER_WAIT_S (an up-to-date long-poll is that long silent)",
    )

    # Outbox relay
    relay_source_url: str = Field(
        default="",
        description="libpq URL of the database holding the outbox (the monolith's); empty: give --source. "
        "A string, not None, so that the setting survives a round trip through the environment",
    )
    relay_batch_size: int = Field(default=500, ge=1, le=100_000, description="Outbox rows per publish-and-mark round")
    relay_poll_interval_s: float = Field(
        default=1.0, gt=0, description="Poll when no NOTIFY arrives; also how often a standby tries for the lock"
    )
    relay_delete_published: bool = Field(default=False, description="Delete rows once published instead of marking")
    relay_metrics_port: int = Field(default=9465, ge=0, description="0 disables the relay's /metrics")

    # Retention (adr/0020): what `topology compact` removes, and when. 0 keeps a kind forever.
    idempotency_window_s: float = Field(
        default=604_800.0, ge=60, description="The idempotency window promised to producers: an event id delivered "
        "again within this long of its first processing is absorbed (applied once); compaction never removes an "
        "idempotency record younger than this"
    )
    retain_ended_leases_s: float = Field(
        default=2_592_000.0, ge=0, description="Committed or released leases whose expiry is older than this are "
        "compacted; 0 keeps them; else at least the idempotency window"
    )
    retain_resolved_dead_letters_s: float = Field(
        default=2_592_000.0, ge=0, description="Re-driven (resolved) dead letters older than this are compacted; "
        "0 keeps them; discarded ones are always kept"
    )
    retain_published_outbox_s: float = Field(
        default=604_800.0, ge=0, description="`topology compact --outbox`: published rows of a producer's outbox "
        "(the relay's source) older than this; 0 keeps them. The projection's decision outbox is never compacted"
    )
    compact_interval_s: float = Field(
        default=0.0, ge=0, description="A projector runs the compaction this often (one member at a time); "
        "0: never (run `topology compact` from a scheduler)"
    )

    # Observability (adr/0011; tracing exporters use the standard OTEL_* variables, runtime/tracing.py)
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto", description="auto: JSON for project/serve/relay/router, text for interactive commands"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="-v forces DEBUG")
    metrics_host: str = Field(
        default="127.0.0.1", description="Address the projector's and relay's /metrics listen on (0.0.0.0 in containers)"
    )

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _case_insensitive(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        return value.upper() if value.lower() in ("debug", "info", "warning", "error") else value.lower()

    @field_validator("grpc_cell_ids")
    @classmethod
    def _cell_numbers(cls, value: str) -> str:
        parse_cell_numbers(value)  # raises ValueError with what is wrong
        return value

    @field_validator("database_url")
    @classmethod
    def _libpq_url(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @model_validator(mode="after")
    def _tls_files_together(self) -> Settings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TOPOLOGY_TLS_CERT and TOPOLOGY_TLS_KEY go together: set both, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("TOPOLOGY_TLS_CLIENT_CA needs TOPOLOGY_TLS_CERT and TOPOLOGY_TLS_KEY (mutual TLS is TLS)")
        return self

    @model_validator(mode="after")
    def _leases_outlive_the_window(self) -> Settings:
        # A commit or rollback sent again inside the window must still find its lease.
        if 0 < self.retain_ended_leases_s < self.idempotency_window_s:
            raise ValueError("TOPOLOGY_RETAIN_ENDED_LEASES_S must be 0 or at least TOPOLOGY_IDEMPOTENCY_WINDOW_S")
        return self

    @property
    def grpc_cell_numbers(self) -> dict[str, int]:
        """TOPOLOGY_GRPC_CELL_IDS: cell name -> GitLab's numeric cell id."""
        return parse_cell_numbers(self.grpc_cell_ids)

    @model_validator(mode="after")
    def _stale_bound_above_the_wait(self) -> Settings:
        if self.router_stale_after_s <= self.router_wait_s:
            raise ValueError("TOPOLOGY_ROUTER_STALE_AFTER_S must exceed TOPOLOGY_ROUTER_WAIT_S")
        return self

    @property
    def libpq_url(self) -> str:
        """The URL for psycopg itself (LISTEN/NOTIFY)."""
        return self.database_url.replace("postgresql+psycopg://", "postgresql://", 1)

    @property
    def sqlalchemy_url(self) -> str:
        """The same database for SQLAlchemy, pinned to the psycopg 3 driver."""
        url = self.libpq_url
        if url.startswith("postgres://"):
            url = "postgresql://" + url[len("postgres://") :]
        return url.replace("postgresql://", "postgresql+psycopg://", 1)

    @property
    def cells_partitions(self) -> int:
        # One partition, always: cell rules (a session prefix belongs to one cell)
        # compare cells with each other, and only a total order keeps replays
        # deterministic (adr/0004).
        return 1

    @property
    def claim_decisions_partitions(self) -> int:
        # One partition: the decision log is totally ordered, so replaying it
        # applies decisions in exactly the order they were made (adr/0010).
        return 1

    @property
    def topics(self) -> tuple[str, ...]:
        """The topics a projector consumes."""
        return (self.cells_topic, self.claims_topic, self.claim_requests_topic)

    def topic_for(self, event_type: str) -> str:
        if event_type in CELL_EVENT_TYPES:
            return self.cells_topic
        if event_type in REQUEST_EVENT_TYPES:
            return self.claim_requests_topic
        if event_type in DECISION_EVENT_TYPES:
            return self.claim_decisions_topic
        return self.claims_topic

    @property
    def claim_secret(self) -> bytes:
        return self.claim_hmac_secret.get_secret_value().encode("utf-8")
