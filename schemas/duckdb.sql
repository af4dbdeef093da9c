-- Output contract (docs/design.md#output-contract) in DuckDB. Primary keys make every write
-- idempotent: a replayed insert hits ON CONFLICT instead of doubling a row.
CREATE TABLE IF NOT EXISTS metric_changelog (
  metric       VARCHAR NOT NULL,
  dims         VARCHAR NOT NULL,
  granularity  VARCHAR NOT NULL,
  window_start TIMESTAMPTZ NOT NULL,
  window_end   TIMESTAMPTZ NOT NULL,
  value        BIGINT NOT NULL,
  sign         TINYINT NOT NULL,
  revision     INTEGER NOT NULL,
  pane_index   INTEGER NOT NULL,
  timing       VARCHAR NOT NULL,
  is_final     BOOLEAN NOT NULL,
  emitted_at   TIMESTAMPTZ NOT NULL,
  sketch       BLOB,  -- --distinct hll: the window's serialized DataSketches HLL sketch
  PRIMARY KEY (metric, dims, granularity, window_start, revision, sign)
);
CREATE TABLE IF NOT EXISTS metric_latest (
  metric       VARCHAR NOT NULL,
  dims         VARCHAR NOT NULL,
  granularity  VARCHAR NOT NULL,
  window_start TIMESTAMPTZ NOT NULL,
  window_end   TIMESTAMPTZ NOT NULL,
  value        BIGINT NOT NULL,
  revision     INTEGER NOT NULL,
  timing       VARCHAR NOT NULL,
  is_final     BOOLEAN NOT NULL,
  emitted_at   TIMESTAMPTZ NOT NULL,
  sketch       BLOB,
  PRIMARY KEY (metric, dims, granularity, window_start)
);
-- Files written before sketches were stored gain the column (NULL: no sketch).
ALTER TABLE metric_changelog ADD COLUMN IF NOT EXISTS sketch BLOB;
ALTER TABLE metric_latest ADD COLUMN IF NOT EXISTS sketch BLOB;
CREATE TABLE IF NOT EXISTS dead_letter (
  dead_letter_id VARCHAR NOT NULL PRIMARY KEY,
  payload        BLOB NOT NULL,
  reason         VARCHAR NOT NULL,
  detail         VARCHAR NOT NULL,
  ingest_time    TIMESTAMPTZ NOT NULL
);
