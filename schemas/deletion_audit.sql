-- One row per deletion request (`clickstream forget`, pipeline/forget.py). Identities are
-- in their stored form: pseudonyms when the job pseudonymises, so the log never holds a
-- clear id the archive does not.
CREATE TABLE IF NOT EXISTS deletion_audit (
  request_id          VARCHAR NOT NULL PRIMARY KEY,
  requested_at        TIMESTAMPTZ NOT NULL,
  requested_by        VARCHAR NOT NULL,
  pseudonymized       BOOLEAN NOT NULL,
  identities          VARCHAR NOT NULL,  -- JSON {"user_id": [...], "device_id": [...]}
  partitions          VARCHAR NOT NULL,  -- JSON [{"file": ..., "events_removed": n}, ...]
  events_removed      BIGINT NOT NULL,
  dead_letters_purged BIGINT NOT NULL,
  days_refinalized    VARCHAR NOT NULL,  -- JSON ["YYYY-MM-DD", ...]
  status              VARCHAR NOT NULL   -- started (archive being rewritten) | done
);
