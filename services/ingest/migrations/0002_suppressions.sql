-- Identifiers suppressed by a deletion request (GDPR): messages carrying one are dropped.
create table ingest.suppressions (
    space_id text not null,
    kind text not null,
    value text not null,
    reason text not null default '',
    created_at timestamptz not null default now(),
    primary key (space_id, kind, value)
);
