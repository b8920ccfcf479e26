-- The ingest service's tables: sources, the event log, and the dedup keys.
create schema if not exists ingest;

-- A source is one write key (a website, an app, a server). Sources of one space share
-- identities: the identity service stitches within a space.
create table ingest.sources (
    id text primary key,
    space_id text not null default 'default',
    name text not null,
    write_key text not null unique,
    enabled boolean not null default true,
    created_at timestamptz not null default now()
);

-- The event log. Partitioned by month of received_at so that retention is DROP PARTITION.
-- xid is the id of the writing transaction: consumers read in (xid, seq) order below the
-- snapshot horizon so that a late commit is never skipped (see touchpoint.platform.eventlog).
create table ingest.events (
    seq bigint generated always as identity,
    xid xid8 not null default pg_current_xact_id(),
    space_id text not null,
    source_id text not null,
    message_id text not null,
    type text not null,
    user_id text,
    anonymous_id text,
    previous_id text,
    group_id text,
    event text,
    name text,
    "timestamp" timestamptz not null,
    original_timestamp timestamptz,
    sent_at timestamptz,
    received_at timestamptz not null,
    properties jsonb,
    traits jsonb,
    context jsonb,
    integrations jsonb,
    campaign jsonb,
    click_ids jsonb
) partition by range (received_at);

create index events_log_order on ingest.events (xid, seq);
create index events_message on ingest.events (source_id, message_id);

-- Rows the monthly partitions do not cover (a clock far off) land here instead of failing.
create table ingest.events_default partition of ingest.events default;

-- Creates the monthly partitions from this month to `months_ahead` months ahead.
create function ingest.ensure_partitions(months_ahead int) returns void
language plpgsql as $$
declare
    m date;
    name text;
begin
    for i in 0..months_ahead loop
        m := (date_trunc('month', now() at time zone 'utc') + make_interval(months => i))::date;
        name := 'events_' || to_char(m, 'YYYYMM');
        if to_regclass('ingest.' || name) is null then
            execute format(
                'create table ingest.%I partition of ingest.events for values from (%L) to (%L)',
                name, m::timestamp at time zone 'utc', (m + interval '1 month')::timestamp at time zone 'utc');
        end if;
    end loop;
end $$;

select ingest.ensure_partitions(2);

-- Dedup keys: one row per (source, message id) ever accepted within the dedup window. The
-- unique key makes two replicas that receive the same message at once store it once: the
-- second insert waits for the first transaction and then finds the key.
create table ingest.message_ids (
    source_id text not null,
    message_id text not null,
    received_at timestamptz not null,
    primary key (source_id, message_id)
);
-- Pruning by age: a BRIN index costs almost nothing per insert and rows arrive in time order.
create index message_ids_received on ingest.message_ids using brin (received_at);

-- The published log: the one way other services read events (see eventlog.py).
create view ingest.event_log as
select xid, seq, space_id, source_id, message_id, type, user_id, anonymous_id, previous_id,
       group_id, event, name, "timestamp", original_timestamp, sent_at, received_at,
       properties, traits, context, integrations, campaign, click_ids
from ingest.events;

comment on view ingest.event_log is
    'Published by the ingest service for consumers: read in (xid, seq) order below pg_snapshot_xmin.';
