-- The attribution service's tables: settings per space, touches and conversions derived from the
-- event log, identity links (used until the identity service publishes its view), spend, and
-- recomputation jobs.
create schema if not exists attribution;

-- Settings of an identity space. Touches and conversions carry a generation: a recomputation
-- writes the next one while reports read active_generation, then switches.
create table attribution.spaces (
    space_id text primary key,
    conversion_events text[] not null default array['Order Completed', 'Signed Up'],
    -- {"<event>": days}: lookback windows per conversion event.
    lookback_days jsonb not null default '{}',
    default_lookback_days double precision not null default 30,
    -- [{"channel": ..., "medium_in": [...], ...}]: channel rules tried before the defaults.
    channel_rules jsonb not null default '[]',
    version bigint not null default 1,
    active_generation int not null default 0,
    -- The generation a running recomputation writes (the live consumer writes it too).
    pending_generation int,
    updated_at timestamptz not null default now()
);

-- One row per event that is a marketing touch.
create table attribution.touches (
    space_id text not null,
    generation int not null,
    source_id text not null,
    message_id text not null,
    touch_time timestamptz not null,
    user_id text,
    anonymous_id text,
    kind text not null,
    channel text not null,
    campaign text,
    source text,
    medium text,
    content text,
    term text,
    network text,
    referrer_domain text,
    primary key (space_id, generation, source_id, message_id)
);
create index touches_time on attribution.touches (space_id, generation, touch_time);

-- One row per conversion: deduplicated by order id (or the message id when there is none).
create table attribution.conversions (
    space_id text not null,
    generation int not null,
    conversion_id text not null,
    event text not null,
    conversion_time timestamptz not null,
    value double precision not null default 0,
    currency text not null default 'USD',
    offline boolean not null default false,
    user_id text,
    anonymous_id text,
    source_id text not null,
    message_id text not null,
    primary key (space_id, generation, conversion_id)
);
create index conversions_time on attribution.conversions (space_id, generation, conversion_time);

-- anonymousId seen with a userId (same event, or alias): the fallback cross-device stitching
-- used while identity.profile_identifiers does not exist (see store.profile_key_sql).
create table attribution.identity_links (
    space_id text not null,
    anonymous_id text not null,
    user_id text not null,
    first_seen timestamptz not null default now(),
    primary key (space_id, anonymous_id, user_id)
);
create index identity_links_user on attribution.identity_links (space_id, user_id);

-- Imported ad spend. Empty source/medium/content mean "the whole campaign".
create table attribution.spend (
    space_id text not null,
    campaign text not null,
    day date not null,
    currency text not null,
    source text not null default '',
    medium text not null default '',
    content text not null default '',
    amount double precision not null check (amount >= 0),
    updated_at timestamptz not null default now(),
    primary key (space_id, campaign, day, currency, source, medium, content)
);

-- Request ids of applied write requests (ImportSpend, RecomputeAttribution): a retry is a no-op.
create table attribution.requests (
    space_id text not null,
    request_id text not null,
    result text not null default '',
    created_at timestamptz not null default now(),
    primary key (space_id, request_id)
);

create table attribution.recompute_jobs (
    id text primary key,
    space_id text not null,
    generation int not null,
    state text not null default 'running',
    -- The live consumer's position when the job started: the job replays the log up to it,
    -- and the live consumer writes the new generation from it on.
    stop_xid bigint not null,
    stop_seq bigint not null,
    processed_events bigint not null default 0,
    total_events bigint not null default 0,
    error text not null default '',
    created_at timestamptz not null default now(),
    ended_at timestamptz
);
