-- metric_latest: the highest revision per (metric, dims, granularity, window_start),
-- read from the append-only changelog (only +1 rows carry a value to serve).
-- {changelog} is replaced by the fully qualified `project.dataset.metric_changelog`.
-- ROW_NUMBER, not MAX(revision) joined back: a row re-inserted outside BigQuery's
-- best-effort insertId window (a re-run hours later) is a byte-identical duplicate, and
-- picking one row per key keeps the view exact even then. window_start is in the
-- PARTITION BY, so a filter on it prunes metric_changelog's day partitions.
SELECT metric, dims, granularity, window_start, window_end, value, revision, pane_index,
       timing, is_final, emitted_at, sketch
FROM (
  SELECT *,
         ROW_NUMBER() OVER (PARTITION BY metric, dims, granularity, window_start
                            ORDER BY revision DESC) AS row_rank
  FROM {changelog}
  WHERE sign > 0
)
WHERE row_rank = 1
