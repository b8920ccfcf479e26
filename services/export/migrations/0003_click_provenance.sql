-- Where each click of export.clicks came from, so that export drops a click when identity
-- erases the events it was seen in (GDPR, identity.erased_events).

-- One row per (event, holder, click id): export.clicks is their aggregate (earliest sighting).
create table export.click_events (
    space_id text not null,
    source_id text not null,
    message_id text not null,
    holder_kind text not null,
    holder text not null,
    kind text not null,
    value text not null,
    seen timestamptz not null,
    campaign jsonb,
    primary key (source_id, message_id, holder_kind, kind, value)
);
create index click_events_click on export.click_events (space_id, holder_kind, holder, kind, value);

-- Events identity erased, as export learnt of them: the click consumer never keeps a click of
-- one, even when it reaches the event after the erasure (it may lag behind ingest's deletion).
-- Ids only, no personal data.
create table export.erased_events (
    source_id text not null,
    message_id text not null,
    erased_time timestamptz not null default now(),
    primary key (source_id, message_id)
);

-- The provenance of the clicks kept so far, from the event log (in this transaction, so that
-- matching never sees a half-built table). Clicks whose events are no longer in the log were
-- made by events already deleted: they are dropped.
do $$
begin
    if to_regclass('ingest.event_log') is not null then
        insert into export.click_events
            (space_id, source_id, message_id, holder_kind, holder, kind, value, seen, campaign)
        select e.space_id, e.source_id, e.message_id, h.holder_kind, h.holder, c->>'kind', c->>'value',
               min(e."timestamp"), (array_agg(nullif(e.campaign, '{}'::jsonb) order by e."timestamp"))[1]
        from ingest.event_log e
        cross join lateral jsonb_array_elements(e.click_ids) as c
        cross join lateral (values ('user_id', e.user_id), ('anonymous_id', e.anonymous_id))
            as h(holder_kind, holder)
        where jsonb_typeof(e.click_ids) = 'array'
          and c->>'kind' in ('gclid', 'gbraid', 'wbraid', 'fbclid')
          and coalesce(c->>'value', '') <> ''
          and coalesce(h.holder, '') <> ''
        group by 1, 2, 3, 4, 5, 6, 7;
    end if;
    delete from export.clicks k
    where not exists (
        select 1 from export.click_events ce
        where ce.space_id = k.space_id and ce.holder_kind = k.holder_kind and ce.holder = k.holder
          and ce.kind = k.kind and ce.value = k.value);
end $$;
