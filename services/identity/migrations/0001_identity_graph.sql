-- The identity service's tables: the identity graph (identifiers, links, components), the
-- profiles' events, traits and merge log, GDPR tombstones, and the published views.
create schema if not exists identity;

-- Per-space overrides of the stitching rules; the service's settings are the defaults.
-- Changed rules apply to the events applied afterwards (and to components recomputed later).
create table identity.space_rules (
    space_id text primary key,
    -- {"user_id": 1, "email": 3}: the most identifiers of a kind one profile may hold.
    limits jsonb not null default '{}',
    -- The limit of kinds not in `limits` (null: the setting).
    default_limit int check (default_limit >= 1),
    -- The kinds ranked first, in order (null: the setting).
    priority text[],
    -- A regular expression: matching values never link anything (null: the setting).
    blocked_pattern text,
    updated_at timestamptz not null default now()
);

-- Every identifier seen, the profile it belongs to and the component of the graph it is in.
-- first_* is its birth: the earliest event (time, message id, source id) that carried it.
create table identity.identifiers (
    space_id text not null,
    kind text not null,
    value text not null,
    profile_id text not null,
    -- null: linked to nothing (a profile of its own that no event has linked yet)
    component_id bigint,
    first_time timestamptz not null,
    first_message_id text not null,
    first_source_id text not null,
    last_time timestamptz not null,
    -- Detached by SplitProfile: links nothing any more.
    isolated boolean not null default false,
    -- Device and browser details from its latest event (device and anonymous ids only).
    attrs jsonb,
    primary key (space_id, kind, value)
) with (fillfactor = 80);  -- room for HOT updates of last_time
create index identifiers_profile on identity.identifiers (profile_id);
create index identifiers_component on identity.identifiers (component_id) where component_id is not null;

-- Connected parts of the graph: the unit of recomputation. max_* is the key of the latest link
-- applied: an event later than it is applied directly, an earlier one recomputes the component.
create table identity.components (
    component_id bigint primary key,
    space_id text not null,
    max_time timestamptz,
    max_message_id text,
    max_source_id text,
    size int not null
);

-- One row per distinct identifier set that events carried (a link), with its earliest event.
create table identity.links (
    space_id text not null,
    set_key bytea not null,
    -- "kind:value" in priority order
    idents text[] not null,
    first_time timestamptz not null,
    first_message_id text not null,
    first_source_id text not null,
    -- Cut by SplitProfile: links nothing any more.
    cut boolean not null default false,
    component_id bigint,
    primary key (space_id, set_key)
);
create index links_component on identity.links (component_id) where component_id is not null;
-- Links outside every component (cut, or left with one identifier by detached ones), by
-- identifier, for DeleteProfile; the others are found through their component.
create index links_loose on identity.links using gin (idents) where component_id is null;

-- Every event applied, under its anchor (its highest-priority identifier, which is always
-- stitched): a profile's events are those of its identifiers. Written by COPY; not unique
-- (a message id re-sent after ingest's dedup window is another event).
create table identity.event_refs (
    space_id text not null,
    kind text not null,
    value text not null,
    "time" timestamptz not null,
    message_id text not null,
    source_id text not null
);
create index event_refs_anchor on identity.event_refs (space_id, kind, value, "time", message_id, source_id);

-- Traits, latest value per key per identifier (the anchor of the event that set it).
create table identity.traits (
    space_id text not null,
    kind text not null,
    value text not null,
    key text not null,
    value_json jsonb,
    "time" timestamptz not null,
    message_id text not null,
    source_id text not null,
    primary key (space_id, kind, value, key)
);

-- The merge log: merges, refused merges (with the reason) and splits, with their event.
-- A recomputation supersedes the decisions it no longer makes (kept as history).
create table identity.merge_log (
    id bigint generated always as identity primary key,
    space_id text not null,
    action text not null check (action in ('merged', 'refused', 'split')),
    reason text not null default '',
    limit_kind text not null default '',
    profile_id text not null,
    other_profile_ids text[] not null default '{}',
    identifiers text[] not null default '{}',
    event_time timestamptz,
    source_id text,
    message_id text,
    record_time timestamptz not null default now(),
    superseded_time timestamptz,
    note text not null default '',
    request_id text
);
create index merge_log_event on identity.merge_log (source_id, message_id) where superseded_time is null;
create index merge_log_profile on identity.merge_log (profile_id);
create index merge_log_others on identity.merge_log using gin (other_profile_ids);
create unique index merge_log_request on identity.merge_log (request_id) where request_id is not null;

-- Deleted profiles (GDPR). No identifier is kept: only the profile id.
create table identity.profile_tombstones (
    profile_id text primary key,
    space_id text not null,
    deleted_time timestamptz not null default now(),
    reason text not null default '',
    identifiers_deleted int not null,
    events_deleted bigint not null default 0
);

-- Digests of deleted identifiers: events carrying one that reach identity after the deletion
-- are not stitched, and are queued for deletion.
create table identity.deleted_identifiers (
    space_id text not null,
    digest bytea not null,
    primary key (space_id, digest)
);

-- Events to delete through IngestService.DeleteEvents (retried until done).
create table identity.deletion_queue (
    source_id text not null,
    message_id text not null,
    space_id text not null,
    profile_id text not null default '',
    queued_time timestamptz not null default now(),
    primary key (source_id, message_id)
);
create index deletion_queue_profile on identity.deletion_queue (profile_id);

-- Published, read-only, for other services and warehouse users -----------------------------

-- (kind, value) -> profile.
create view identity.profile_identifiers as
select space_id, kind, value, profile_id, first_time as first_seen_time, last_time as last_seen_time
from identity.identifiers;
comment on view identity.profile_identifiers is
    'Published by the identity service: the profile of every identifier (space_id, kind, value).';

-- Segment's warehouse `identifies` shape: which anonymous ids belong to which user id.
create view identity.identifies as
select a.space_id, a.value as anonymous_id, u.value as user_id, a.profile_id,
       a.first_time as anonymous_first_seen_time, u.first_time as user_first_seen_time
from identity.identifiers a
join identity.identifiers u on u.profile_id = a.profile_id and u.kind = 'user_id'
where a.kind = 'anonymous_id';
comment on view identity.identifies is
    'Published by the identity service: anonymous_id <-> user_id through stitched profiles.';

-- Segment's warehouse `users` shape: one row per user id with the profile's latest traits.
create view identity.users as
select u.space_id, u.value as id, u.profile_id,
       coalesce((
           select jsonb_object_agg(t.key, t.value_json)
           from (
               select distinct on (t.key) t.key, t.value_json
               from identity.identifiers i
               join identity.traits t on t.space_id = i.space_id and t.kind = i.kind and t.value = i.value
               where i.profile_id = u.profile_id
               order by t.key, t."time" desc, t.message_id desc
           ) t
       ), '{}'::jsonb) as traits,
       (select min(i.first_time) from identity.identifiers i where i.profile_id = u.profile_id) as first_seen_time,
       (select max(i.last_time) from identity.identifiers i where i.profile_id = u.profile_id) as last_seen_time
from identity.identifiers u
where u.kind = 'user_id';
comment on view identity.users is
    'Published by the identity service: one row per user id with its profile''s latest traits.';

-- Deleted profiles: every service drops what it derived for these profile ids.
create view identity.deleted_profiles as
select space_id, profile_id, deleted_time, reason from identity.profile_tombstones;
comment on view identity.deleted_profiles is
    'Published by the identity service: profiles deleted for GDPR; drop everything derived from them.';
