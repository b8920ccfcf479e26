-- The export service's tables: destinations, conversions, the clicks it keeps from the event
-- log, the delivery outbox with its attempts, and the view it publishes for attribution.
create schema if not exists export;

-- Where conversions go. Credentials are either named environment variables (credential_env:
-- key -> variable) or a Fernet token of a JSON object (credentials_encrypted); never plain.
create table export.destinations (
    id text primary key,
    display_name text not null default '',
    kind text not null,
    base_url text not null default '',
    settings jsonb not null default '{}',
    credential_env jsonb not null default '{}',
    credentials_encrypted bytea,
    credential_keys text[] not null default '{}',
    event_names text[] not null default '{}',
    enabled boolean not null default true,
    requests_per_second double precision not null default 0,
    max_batch_size int not null default 0,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

-- One row per offline conversion, unique per (space, source, order id). Customer information is
-- kept only hashed (per platform); the plain values are used for matching inside the intake
-- transaction and never stored. xid lets consumers read in commit-safe order like the event log.
create table export.conversions (
    id bigint generated always as identity primary key,
    xid xid8 not null default pg_current_xact_id(),
    space_id text not null,
    source text not null,
    order_id text not null,
    event_name text not null,
    event_time timestamptz not null,
    time_zone text not null default '',
    value numeric,
    currency text not null default '',
    store_id text not null default '',
    meta_user_data jsonb not null default '{}',
    google_user jsonb not null default '{}',
    -- Click ids as the store sent them.
    gclid text not null default '',
    gbraid text not null default '',
    wbraid text not null default '',
    fbclid text not null default '',
    -- Matching: the profile, how, and the most recent eligible clicks found in the event log.
    profile_id text,
    match_status text not null,
    match_reason text not null,
    click_kind text,
    click_value text,
    click_time timestamptz,
    fbc text,
    campaign jsonb,
    received_at timestamptz not null default now(),
    unique (space_id, source, order_id)
);
create index conversions_log_order on export.conversions (xid, id);

-- Ad clicks from the event log, per holder (a user_id or an anonymous_id), kept by a consumer
-- of ingest.event_log: only gclid, gbraid, wbraid and fbclid, the ones that can be exported.
create table export.clicks (
    space_id text not null,
    holder_kind text not null,
    holder text not null,
    kind text not null,
    value text not null,
    first_seen timestamptz not null,
    campaign jsonb,
    primary key (space_id, holder_kind, holder, kind, value)
);
create index clicks_by_holder_time on export.clicks (space_id, holder_kind, holder, first_seen desc);

-- The outbox: one row per (conversion, destination). States: pending (due at next_attempt_at),
-- sending (claimed by a worker until lease_until), delivered, dead (can never succeed as it
-- is: see reason), skipped (not for this destination).
create table export.outbox (
    id bigint generated always as identity primary key,
    conversion_id bigint not null references export.conversions (id),
    destination_id text not null references export.destinations (id),
    state text not null default 'pending',
    attempts int not null default 0,
    -- attempts at the last replay: the retry budget counts from there.
    retry_base int not null default 0,
    next_attempt_at timestamptz not null default now(),
    lease_token bigint,
    lease_until timestamptz,
    reason text not null default '',
    detail text not null default '',
    created_at timestamptz not null default now(),
    delivered_at timestamptz,
    dead_at timestamptz,
    unique (conversion_id, destination_id)
);
create index outbox_due on export.outbox (destination_id, next_attempt_at, id) where state = 'pending';
create index outbox_leased on export.outbox (lease_until) where state = 'sending';
create index outbox_dead on export.outbox (destination_id, id) where state = 'dead';

-- One row per HTTP exchange (or file written) of a batch, with the start of the answer.
create table export.requests (
    id bigint generated always as identity primary key,
    destination_id text not null,
    sent_at timestamptz not null default now(),
    http_status int not null,
    row_count int not null,
    http_requests int not null,
    duration_ms double precision not null,
    response text not null default ''
);

-- Each try of each delivery: what the platform said about that row.
create table export.attempts (
    outbox_id bigint not null references export.outbox (id),
    attempt int not null,
    request_id bigint,
    at timestamptz not null default now(),
    outcome text not null,
    reason text not null default '',
    detail text not null default '',
    primary key (outbox_id, attempt)
);

-- Published for the attribution service: each stored offline conversion with its profile and
-- the clicks it was matched to. Read in (xid, seq) order below pg_snapshot_xmin, like the log.
create view export.offline_conversions as
select c.xid, c.id as seq, c.id as conversion_id, c.space_id, c.source, c.order_id, c.event_name,
       c.event_time, c.value, c.currency, c.store_id, c.profile_id, c.match_status, c.match_reason,
       coalesce(nullif(c.gclid, ''), case when c.click_kind = 'gclid' then c.click_value end) as gclid,
       coalesce(nullif(c.gbraid, ''), case when c.click_kind = 'gbraid' then c.click_value end) as gbraid,
       coalesce(nullif(c.wbraid, ''), case when c.click_kind = 'wbraid' then c.click_value end) as wbraid,
       c.fbc, c.click_time, c.campaign, c.received_at
from export.conversions c;

comment on view export.offline_conversions is
    'Published by the export service for attribution: offline conversions, matched profile and clicks.';
