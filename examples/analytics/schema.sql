-- ngx_infer usage events (schema version 1) in PostgreSQL.
--
-- One row per finished request, as the gateway wrote it to the Redis
-- Stream and consumer.py read it.  Idempotent: psql -f schema.sql, or
-- consumer.py --init-schema, may run any number of times.
--
-- An empty string in the event (unknown, not applicable) is NULL here.
-- Days are UTC days: a partition per day, made by infer_usage_partition()
-- when a row first needs it (consumer.py calls it before inserting).

CREATE TABLE IF NOT EXISTS infer_usage (
    ts                 timestamptz   NOT NULL,  -- event "time" (ms)
    request_id         text          NOT NULL,
    v                  smallint      NOT NULL,  -- schema version, 1
    trace_id           text,
    gateway            text,
    tenant             text,
    key_id             text,
    subject            text,
    model              text,
    model_served       text,
    pool               text,
    endpoint           text,
    status             bigint,
    stream             boolean,
    prompt_tokens      bigint,
    completion_tokens  bigint,
    cached_tokens      bigint,
    reasoning_tokens   bigint,
    estimated          boolean,
    ttft_ms            bigint,
    duration_ms        bigint,
    request_bytes      bigint,
    response_bytes     bigint,
    cost               numeric(20,9),           -- US dollars
    -- the idempotency key: a redelivered event (a consumer that died
    -- between its commit and its XACK) is the same (ts, request_id) and
    -- INSERT ... ON CONFLICT DO NOTHING keeps the first
    PRIMARY KEY (ts, request_id)
) PARTITION BY RANGE (ts);

-- Events the consumer kept aside instead of inserting: another schema
-- version, a missing field, a value that is not what v1 says.  The raw
-- fields are kept (as text) for a person to look at and replay; the key is
-- the stream entry, so a redelivered reject is kept once too.
CREATE TABLE IF NOT EXISTS infer_usage_rejected (
    stream    text         NOT NULL,
    entry_id  text         NOT NULL,
    received  timestamptz  NOT NULL DEFAULT now(),
    reason    text         NOT NULL,
    fields    jsonb        NOT NULL,
    PRIMARY KEY (stream, entry_id)
);

-- The partition for one UTC day, made if missing; returns its name.
-- Callers that race for the same new day are serialized by an advisory
-- lock; CREATE TABLE IF NOT EXISTS after the lock sees the winner's table.
-- Creating a partition locks infer_usage for a moment: it happens once a
-- day (and once per older day a backlog brings).  There is no DEFAULT
-- partition on purpose: every later CREATE ... PARTITION OF would have to
-- scan it, and would fail while it held a row of the new day.
CREATE OR REPLACE FUNCTION infer_usage_partition(day date)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    part text := 'infer_usage_p' || to_char(day, 'YYYYMMDD');
BEGIN
    IF to_regclass(part) IS NOT NULL THEN
        RETURN part;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('infer_usage_partition'));
    EXECUTE format(
        'CREATE TABLE IF NOT EXISTS %I PARTITION OF infer_usage'
        ' FOR VALUES FROM (%L) TO (%L)',
        part, day::timestamp AT TIME ZONE 'UTC',
        (day + 1)::timestamp AT TIME ZONE 'UTC');
    RETURN part;
END
$$;
