-- Hostile peers (issue 12): API tokens that expire and can be revoked, and an audit log that
-- can be kept for a retention period without lifting append-only for recent rows.

ALTER TABLE api_tokens ADD COLUMN id uuid NOT NULL DEFAULT gen_random_uuid();
ALTER TABLE api_tokens ADD CONSTRAINT api_tokens_id UNIQUE (id);
ALTER TABLE api_tokens ADD COLUMN expires_at timestamptz;
ALTER TABLE api_tokens ADD COLUMN revoked_at timestamptz;
ALTER TABLE api_tokens ADD COLUMN last_used_at timestamptz;

-- The audit log becomes a table partitioned by day on `at`. Rows can never be updated or
-- deleted (row triggers, cloned onto every partition); a whole day is dropped only once it is
-- older than the retention period, by audit_log_drop_expired() and by nothing else we ship.
DROP TRIGGER audit_log_no_update_delete ON audit_log;
DROP TRIGGER audit_log_no_truncate ON audit_log;
ALTER TABLE audit_log RENAME TO audit_log_before_partitions;
ALTER INDEX audit_log_action RENAME TO audit_log_before_partitions_action;
ALTER INDEX audit_log_at RENAME TO audit_log_before_partitions_at;
ALTER SEQUENCE audit_log_id_seq OWNED BY NONE;

CREATE TABLE audit_log (
    id          bigint NOT NULL DEFAULT nextval('audit_log_id_seq'),
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    outcome     text NOT NULL DEFAULT 'ok',
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (id, at)
) PARTITION BY RANGE (at);
ALTER SEQUENCE audit_log_id_seq OWNED BY audit_log.id;
CREATE INDEX audit_log_action ON audit_log (action, id);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_id ON audit_log (id);

-- Day partitions from `first` to `last` (inclusive), each refusing TRUNCATE on its own.
CREATE FUNCTION audit_log_ensure_days(first date, last date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    day date := first;
    made integer := 0;
    name text;
BEGIN
    WHILE day <= last LOOP
        name := 'audit_log_d' || to_char(day, 'YYYYMMDD');
        IF to_regclass(name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF audit_log FOR VALUES FROM (%L) TO (%L)',
                name, (day::timestamp AT TIME ZONE 'UTC'),
                ((day + 1)::timestamp AT TIME ZONE 'UTC'));
            EXECUTE format(
                'CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON %I'
                ' FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()', name);
            made := made + 1;
        END IF;
        day := day + 1;
    END LOOP;
    RETURN made;
END;
$$;

-- Drop whole partitions whose every row is older than `days` days; returns their names.
-- A partition holding any row younger than that is never touched.
CREATE FUNCTION audit_log_drop_expired(days integer) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    part record;
    cutoff timestamptz := now() - make_interval(days => days);
BEGIN
    IF days < 1 THEN
        RAISE EXCEPTION 'retention must be at least one day';
    END IF;
    FOR part IN
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'audit_log'::regclass
    LOOP
        IF part.relname = 'audit_log_default' THEN
            CONTINUE;
        END IF;
        IF (substring(part.bound FROM 'TO \(''([^'']+)''\)'))::timestamptz <= cutoff THEN
            EXECUTE format('ALTER TABLE audit_log DETACH PARTITION %I', part.relname);
            EXECUTE format('DROP TABLE %I', part.relname);
            RETURN NEXT part.relname;
        END IF;
    END LOOP;
END;
$$;

-- Every row written before this migration moves into the partition of its day.
SELECT audit_log_ensure_days(
    LEAST(
        (SELECT min(at) FROM audit_log_before_partitions) AT TIME ZONE 'UTC',
        now() AT TIME ZONE 'UTC'
    )::date,
    (now() AT TIME ZONE 'UTC')::date + 7
);
INSERT INTO audit_log SELECT * FROM audit_log_before_partitions;
DROP TABLE audit_log_before_partitions;
-- A safety net for rows outside every day partition (the clock jumped ahead): kept forever.
CREATE TABLE audit_log_default PARTITION OF audit_log DEFAULT;
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log_default
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

CREATE TRIGGER audit_log_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
