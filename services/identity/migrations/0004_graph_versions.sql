-- A counter per space, moved by every transaction that writes the space's graph (they all hold
-- the space's graph lock, store.lock_graph). The consumer prepares a batch outside its
-- transaction, against the graph as of a version, while the previous batch commits; it writes
-- the batch only if the graph is still at that version, and prepares it again under the lock
-- otherwise (a split, a deletion or another replica wrote the space meanwhile).
create table identity.graph_versions (
    space_id text primary key,
    version bigint not null
);
insert into identity.graph_versions (space_id, version)
select space_id, 1 from identity.identifiers group by space_id;
