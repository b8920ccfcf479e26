-- A cheaper outbox: at thousands of conversions per second most of Postgres' time went to the
-- outbox's bookkeeping, not to the conversions. Each change keeps every guarantee of 0001.

-- 1. No foreign keys on the outbox and its attempts. Each checked row ran a lookup that also
--    locked the referenced row (a heap write and a WAL record per row), and they were half the
--    cost of queueing a conversion. The references hold by construction: outbox rows are only
--    inserted by the intake transaction for the conversions it has just inserted and for
--    existing destinations, attempts only for outbox rows that worker holds, and no conversion,
--    destination or outbox row is ever deleted.
alter table export.outbox drop constraint if exists outbox_conversion_id_fkey;
alter table export.outbox drop constraint if exists outbox_destination_id_fkey;
alter table export.attempts drop constraint if exists attempts_outbox_id_fkey;

-- 2. Claiming a row is a HOT update (no index entry written): no index covers or filters on the
--    columns a claim changes (state, attempts, lease_token, lease_until, reason), and pages keep
--    room for the claimed version of their rows. A row waits in the outbox_due index while
--    next_attempt_at is set; finishing it (delivered, dead, skipped) clears next_attempt_at,
--    which takes it out of the index. A claimed row stays in outbox_due with state 'sending'
--    until its result is recorded; a claim skips it unless its lease has run out (so a stopped
--    worker's rows are taken again without a sweeper). Rows intake hands straight to a lane of
--    its process are inserted leased, and due when that lease runs out.
alter table export.outbox set (fillfactor = 50);
alter table export.outbox alter column next_attempt_at drop not null;
update export.outbox set next_attempt_at = null where state in ('delivered', 'dead', 'skipped');
drop index if exists export.outbox_due;
drop index if exists export.outbox_leased;
drop index if exists export.outbox_dead;
create index outbox_due on export.outbox (destination_id, next_attempt_at, id)
    where next_attempt_at is not null;
create index outbox_dead on export.outbox (destination_id, id) where dead_at is not null;

-- 3. A delivered row's last attempt lives on the row (attempts, delivered_at, reason, detail and
--    request_id: the exchange that delivered it) instead of one export.attempts row per delivery;
--    export.attempts keeps every other attempt (retries, failures, skips). GetDeliveryStatus
--    shows both, so the history of every delivery is complete.
alter table export.outbox add column request_id bigint;
