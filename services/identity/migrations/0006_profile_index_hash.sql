-- The profile of each identifier is looked up by equality only (a profile's members, a batch's
-- profiles): a hash index serves that, and inserting into it costs less than into a btree,
-- where profile ids (digests, in no order) land on a random leaf each time. The consumer
-- inserts one entry per new identifier.
drop index identity.identifiers_profile;
create index identifiers_profile on identity.identifiers using hash (profile_id);
