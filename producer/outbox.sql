-- Transactional outbox of the topology store (adr/0008, adr/0014, producer/README.md).
--
-- The owning application (the monolith) inserts one row per event in the SAME
-- transaction as its own change; `topology relay` publishes committed rows to
-- Kafka in id order and marks (or deletes) them once the broker acknowledged.
--
-- Idempotent: safe to run on every deploy. Needs PostgreSQL 11 or newer.
-- Apply it in one transaction (psql -1 -f outbox.sql, or your migration tool).
-- It also upgrades a table created by an older version in place (the
-- "Upgrade" block below): running it again is the whole migration.

-- CACHE 1 is part of the contract: with a per-session cache a later
-- transaction could draw a smaller id than an earlier one, and per-key order
-- (below) would no longer follow commit order. Never raise it.
CREATE SEQUENCE IF NOT EXISTS topology_outbox_id_seq AS bigint CACHE 1 NO CYCLE;

CREATE TABLE IF NOT EXISTS topology_outbox (
    -- Assigned by the trigger below, not by the writer (one exception: see the trigger).
    id            bigint      PRIMARY KEY,
    event_id      uuid        NOT NULL,
    event_type    text        NOT NULL,
    -- The Kafka key: the event's partition key (cell id, or BUCKET:value).
    -- Always the writer's, JSON rows too: the trigger locks it at insert time.
    partition_key text        NOT NULL,
    -- Exactly one of payload and payload_json (topology_outbox_one_payload).
    -- Avro single-object encoding (C3 01 | CRC-64-AVRO fingerprint | body),
    -- exactly the bytes the Kafka record carries.
    payload       bytea,
    -- Or the event's fields as `topology emit` takes them (a JSON object; its
    -- "type" may be left out, event_type says it). The relay validates it
    -- against the schema, encodes it and publishes the bytes; event_id and
    -- occurred_at default to this row's event_id and created_at.
    payload_json  jsonb,
    -- Extra Kafka headers, {"name": "text value"}; event_type is always added.
    headers       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- Set by the relay once the broker acknowledged the record.
    published_at  timestamptz,
    -- Set together by the relay when payload_json is not a valid event: the row
    -- is kept, never published and never retried until an operator clears both
    -- (re-drive) or deletes it (discard): producer/README.md.
    failed_at     timestamptz,
    error         text,
    CONSTRAINT topology_outbox_payload_is_single_object
        CHECK (octet_length(payload) >= 10 AND substring(payload FROM 1 FOR 2) = '\xc301'::bytea),
    CONSTRAINT topology_outbox_headers_is_object CHECK (jsonb_typeof(headers) = 'object')
);

-- Upgrade a table of an older layout (bytes only); each step is a no-op on the
-- current one. ADD COLUMN of a nullable column without a default rewrites
-- nothing; a new CHECK scans the table once, when it is first added.
ALTER TABLE topology_outbox ADD COLUMN IF NOT EXISTS payload_json jsonb;
ALTER TABLE topology_outbox ADD COLUMN IF NOT EXISTS failed_at timestamptz;
ALTER TABLE topology_outbox ADD COLUMN IF NOT EXISTS error text;
ALTER TABLE topology_outbox ALTER COLUMN payload DROP NOT NULL;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'topology_outbox'::regclass
                   AND conname = 'topology_outbox_one_payload') THEN
        ALTER TABLE topology_outbox ADD CONSTRAINT topology_outbox_one_payload
            CHECK (num_nonnulls(payload, payload_json) = 1);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'topology_outbox'::regclass
                   AND conname = 'topology_outbox_payload_json_is_object') THEN
        ALTER TABLE topology_outbox ADD CONSTRAINT topology_outbox_payload_json_is_object
            CHECK (jsonb_typeof(payload_json) = 'object');
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'topology_outbox'::regclass
                   AND conname = 'topology_outbox_failure_has_error') THEN
        ALTER TABLE topology_outbox ADD CONSTRAINT topology_outbox_failure_has_error
            CHECK ((failed_at IS NULL) = (error IS NULL));
    END IF;
END
$$;

ALTER SEQUENCE topology_outbox_id_seq OWNED BY topology_outbox.id;

-- The relay reads only unpublished rows, in id order; published rows kept for
-- audit do not slow it down.
CREATE INDEX IF NOT EXISTS topology_outbox_unpublished_idx
    ON topology_outbox (id) WHERE published_at IS NULL;

-- Per-key order = commit order. The writer's transaction takes a
-- transaction-level advisory lock on the partition key BEFORE drawing the id,
-- so of two transactions writing events of one key, the second waits until
-- the first committed or rolled back and then draws a larger id. A relay
-- reading unpublished rows in id order therefore never sees a later event of
-- a key without every earlier one. (Key 1953460335 = 'topo'; hashtext
-- collisions only make two unrelated keys wait for each other.)
CREATE OR REPLACE FUNCTION topology_outbox_lock_key(partition_key text) RETURNS void
    LANGUAGE sql VOLATILE
    AS $$ SELECT pg_advisory_xact_lock(1953460335, hashtext(partition_key)) $$;

CREATE OR REPLACE FUNCTION topology_outbox_before_insert() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM topology_outbox_lock_key(NEW.partition_key);
    NEW.id := nextval(format('%I.topology_outbox_id_seq', TG_TABLE_SCHEMA));
    NEW.published_at := NULL;
    -- A row marked failed at insert would never be read by the relay.
    NEW.failed_at := NULL;
    NEW.error := NULL;
    RETURN NEW;
END
$$;

-- One exception, for a writer that already runs ALL its outbox writes, in every
-- process, behind one transaction-level lock of its own (the topology store's
-- claim decider holds its registry lock): inside that lock it may draw the ids
-- from the sequence itself and say so for its transaction with
-- SET LOCAL topology.outbox_ids_drawn_under_lock = 'on'; the trigger then leaves
-- its unpublished rows alone. Commit order is still id order for every key, and
-- it saves a trigger call and an advisory lock per row: thousands of per-key
-- locks in one transaction exhaust PostgreSQL's lock table ("out of shared
-- memory"). Any other writer leaves id out; an id it gives is replaced anyway.
DROP TRIGGER IF EXISTS topology_outbox_before_insert ON topology_outbox;
CREATE TRIGGER topology_outbox_before_insert
    BEFORE INSERT ON topology_outbox
    FOR EACH ROW
    WHEN (NEW.id IS NULL OR NEW.published_at IS NOT NULL
          OR current_setting('topology.outbox_ids_drawn_under_lock', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION topology_outbox_before_insert();

-- Wakes the relay (LISTEN topology_outbox) when the inserting transaction
-- commits; notifications of one transaction collapse into one. Optional: the
-- relay also polls. At very high commit rates NOTIFY's commit-time lock can
-- become a bottleneck: drop this trigger and rely on polling then.
CREATE OR REPLACE FUNCTION topology_outbox_notify() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM pg_notify('topology_outbox', '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS topology_outbox_notify ON topology_outbox;
CREATE TRIGGER topology_outbox_notify
    AFTER INSERT ON topology_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION topology_outbox_notify();
