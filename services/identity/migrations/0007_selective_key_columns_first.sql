-- The graph's keys with their most selective column first. A btree compares an entry column by
-- column: with (space_id, kind, value), every comparison found the space and the kind equal
-- before it reached the value, and each column after the first text costs Postgres the slow
-- path to find it in the index tuple (nocache_index_getattr; text comparison and finding the
-- columns were a quarter of the consumer's Postgres CPU). With the value first, almost every
-- comparison ends at the first column. The lookups are by equality on all the columns, which
-- any order serves. Postgres CPU per row COPYed into 800k rows (python -m bench.index_cost):
-- event_refs 7.7-8.1 µs -> 5.0-5.8, identifiers' key 8.9-9.0 -> 6.7-7.0; the consumer's Postgres
-- CPU per event at 1M events 63-65 µs -> 51-52 with 0008 (bench/RESULTS.md, stop 14).
alter table identity.identifiers
    drop constraint identifiers_pkey,
    add constraint identifiers_pkey primary key (value, kind, space_id) include (profile_id);

drop index identity.event_refs_anchor;
create index event_refs_anchor on identity.event_refs (value, kind, space_id, "time");

alter table identity.traits
    drop constraint traits_pkey,
    add constraint traits_pkey primary key (value, kind, space_id, key);

-- A link's key is a digest: the space after it (one per deployment, mostly) is only compared
-- when two digests are equal.
alter table identity.links
    drop constraint links_pkey,
    add constraint links_pkey primary key (set_key, space_id);

-- Most events of a deployment come from a few sources: the message id first.
drop index identity.merge_log_event;
create index merge_log_event on identity.merge_log (message_id, source_id) where superseded_time is null;
