-- ResolveProfile reads (space_id, kind, value) -> profile_id: the primary key carries the
-- profile id, so a resolve is one lookup in that index (without a visit to the table's page
-- once the page is all-visible).
alter table identity.identifiers
    drop constraint identifiers_pkey,
    add constraint identifiers_pkey primary key (space_id, kind, value) include (profile_id);

-- Events of a profile are read by anchor and time range, then sorted (a profile's events come
-- from several anchors, so the index order never gives the whole order anyway): message and
-- source ids need not be in the index written for every event.
drop index identity.event_refs_anchor;
create index event_refs_anchor on identity.event_refs (space_id, kind, value, "time");
