-- Trust layer: sealed private keys, instance configuration, connection details, an
-- append-only audit log.

-- Private keys are sealed (AES-256-GCM under the instance's master key) in private_sealed;
-- private_pem only ever holds a key written by a process without the master key, until the
-- next start of the instance's API seals it. A retired key keeps neither: it never signs again.
ALTER TABLE instance_keys ALTER COLUMN private_pem DROP NOT NULL;
ALTER TABLE instance_keys ADD COLUMN private_sealed text;
ALTER TABLE instance_keys ADD CONSTRAINT instance_keys_one_private_form
    CHECK (private_pem IS NULL OR private_sealed IS NULL);

-- The name last read from FEDAGENT_INSTANCE_NAME: a start applies the setting only when the
-- operator changed it, so a name set with PATCH /instance survives restarts.
ALTER TABLE instance ADD COLUMN configured_name text;
UPDATE instance SET configured_name = name;
-- What this instance offers, as set by its admin (merged over the built-in defaults).
ALTER TABLE instance ADD COLUMN capabilities jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE instance ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

-- Which side(s) suspended a connection: a side resumes only its own suspension, and the
-- connection is ACTIVE again once no side holds it suspended.
ALTER TABLE connections ADD COLUMN suspended_by text
    CHECK (suspended_by IS NULL OR suspended_by IN ('local', 'remote', 'both'));
-- When the peer's keys were last read from its identity card (refreshes are rate-limited).
ALTER TABLE connections ADD COLUMN keys_refreshed_at timestamptz;

CREATE INDEX audit_log_action ON audit_log (action, id);
CREATE INDEX audit_log_at ON audit_log (at);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_log_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();

CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
