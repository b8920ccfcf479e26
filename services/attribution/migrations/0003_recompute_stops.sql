-- A recomputation's stop position per partition of the live consumer (with TOUCHPOINT_LOG_PARTITIONS
-- > 1 each partition stands at its own position): [[xid, seq], ...] in partition order. The job
-- replays each partition up to its stop; the live consumer writes the new generation after it.
alter table attribution.recompute_jobs add column stops jsonb;
