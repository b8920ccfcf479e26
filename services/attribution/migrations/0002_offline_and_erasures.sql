-- Offline conversions from the export service (export.offline_conversions) and GDPR erasures
-- (identity.erased_events).

-- The identity profile an offline conversion was matched to by export: reports resolve it
-- through its identifiers (user_id/anonymous_id, stored with it) and fall back to this id.
alter table attribution.conversions add column profile_id text;

-- Deleting what an erased event produced: touches through their primary key (skip scan over
-- the generations), conversions through this index (their key is the order id).
create index conversions_message on attribution.conversions (space_id, source_id, message_id);

-- Events identity erased, as attribution learnt of them: the live consumer never derives a
-- touch or conversion from one, even when it reaches the event after the erasure (it may lag
-- behind ingest's deletion). Ids only, no personal data.
create table attribution.erased_events (
    source_id text not null,
    message_id text not null,
    erased_time timestamptz not null default now(),
    primary key (source_id, message_id)
);
