-- The erasure log: one row per event DeleteProfile erased (and per later event identity deleted
-- because it carried a deleted identifier), written in the transaction that queues the event's
-- deletion at ingest. Other services read it like the event log, in (xid, seq) order below
-- pg_snapshot_xmin, and drop what they derived from those events. No identifier is kept: only
-- the event's ids and the profile id.
create table identity.erasures (
    xid xid8 not null default pg_current_xact_id(),
    seq bigint generated always as identity,
    space_id text not null,
    source_id text not null,
    message_id text not null,
    profile_id text not null,
    erased_time timestamptz not null default now(),
    primary key (xid, seq)
);

-- The profile each deleted identifier belonged to, so that a later event carrying one is
-- erased under that profile (null for deletions made before this column existed).
alter table identity.deleted_identifiers add column profile_id text;

create view identity.erased_events as
select xid, seq, space_id, source_id, message_id, profile_id, erased_time as received_at
from identity.erasures;
comment on view identity.erased_events is
    'Published by the identity service: events erased for GDPR (DeleteProfile); every service drops '
    'what it derived from them. Read in (xid, seq) order below pg_snapshot_xmin, like the event log.';
