-- Identifiers, ids and names compare byte by byte (collation "C"), whatever the database's
-- collation. They are opaque ids, never sorted for people. Under any other collation a text
-- comparison in an index goes through the C library's strcoll: the strings copied into
-- terminated buffers, the locale looked up, then strcoll, then strcmp to break ties. The
-- embedded server's databases are C.UTF-8, which Postgres does not treat as "C": in a perf
-- profile of the consumer's backends at 400k events, strcoll, strcmp and part of the copies made
-- about 5 % of their samples, gone with this migration (bench/RESULTS.md, stop 17; the events/s
-- did not move out of this machine's noise). A linguistic default collation (en_US.UTF-8, which
-- managed servers often have) costs more per comparison. Byte order is code point order, which
-- is how the consumer sorts COPY rows into index order (Python's str order). The views on these
-- columns are made again: a column under a view cannot change.
drop view identity.users;
drop view identity.identifies;
drop view identity.profile_identifiers;

alter table identity.identifiers
    alter column space_id type text collate "C",
    alter column kind type text collate "C",
    alter column value type text collate "C",
    alter column profile_id type text collate "C";
alter table identity.event_refs
    alter column space_id type text collate "C",
    alter column kind type text collate "C",
    alter column value type text collate "C",
    alter column message_id type text collate "C",
    alter column source_id type text collate "C";
alter table identity.traits
    alter column space_id type text collate "C",
    alter column kind type text collate "C",
    alter column value type text collate "C",
    alter column key type text collate "C";
alter table identity.links
    alter column space_id type text collate "C",
    alter column idents type text collate "C";
alter table identity.components
    alter column space_id type text collate "C";
alter table identity.merge_log
    alter column profile_id type text collate "C",
    alter column other_profile_ids type text[] collate "C",
    alter column message_id type text collate "C",
    alter column source_id type text collate "C",
    alter column request_id type text collate "C";
alter table identity.deletion_queue
    alter column source_id type text collate "C",
    alter column message_id type text collate "C",
    alter column profile_id type text collate "C";

create view identity.profile_identifiers as
select space_id, kind, value, profile_id, first_time as first_seen_time, last_time as last_seen_time
from identity.identifiers;
comment on view identity.profile_identifiers is
    'Published by the identity service: the profile of every identifier (space_id, kind, value).';

create view identity.identifies as
select a.space_id, a.value as anonymous_id, u.value as user_id, a.profile_id,
       a.first_time as anonymous_first_seen_time, u.first_time as user_first_seen_time
from identity.identifiers a
join identity.identifiers u on u.profile_id = a.profile_id and u.kind = 'user_id'
where a.kind = 'anonymous_id';
comment on view identity.identifies is
    'Published by the identity service: anonymous_id <-> user_id through stitched profiles.';

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
