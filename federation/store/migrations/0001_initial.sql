-- fedagent 0.1.0: the initial schema. Later migrations are numbered uniquely after it
-- (tests/store/test_migrations.py), each applied once, in name order.

-- ---- initial --------------------------------------------------------------------
-- The whole state of one instance besides what lives in Temporal.

CREATE TABLE instance (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    instance_id text NOT NULL,
    name        text NOT NULL,
    public_url  text NOT NULL,
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE instance_keys (
    key_id       text PRIMARY KEY,
    algorithm    text NOT NULL,
    public_pem   text NOT NULL,
    private_pem  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- NULL while this key signs; set when it is rotated out (verification grace ends then).
    retired_at   timestamptz,
    valid_until  timestamptz
);

CREATE TABLE api_tokens (
    token_hash  text PRIMARY KEY,
    name        text NOT NULL,
    role        text NOT NULL CHECK (role IN ('admin', 'member')),
    workspace   text NOT NULL DEFAULT 'default',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE connections (
    connection_id      uuid PRIMARY KEY,
    remote_instance_id text NOT NULL,
    remote_name        text NOT NULL,
    remote_url         text NOT NULL,
    remote_keys        jsonb NOT NULL,
    direction          text NOT NULL CHECK (direction IN ('outbound', 'inbound')),
    status             text NOT NULL CHECK (status IN ('PENDING', 'ACTIVE', 'SUSPENDED', 'DISCONNECTED')),
    grants             jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
-- At most one live connection per peer.
CREATE UNIQUE INDEX connections_live_peer ON connections (remote_instance_id)
    WHERE status <> 'DISCONNECTED';

CREATE TABLE seen_messages (
    sender_id   text NOT NULL,
    message_id  text NOT NULL,
    seen_at     timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (sender_id, message_id)
);
CREATE INDEX seen_messages_expiry ON seen_messages (expires_at);

CREATE TABLE messages (
    message_id     text NOT NULL,
    direction      text NOT NULL CHECK (direction IN ('in', 'out')),
    type           text NOT NULL,
    command_type   text,
    sender_id      text NOT NULL,
    recipient_id   text NOT NULL,
    correlation_id text,
    agent_id       uuid,
    payload        jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (direction, message_id)
);

-- One row per agent run: the requester's projection (role 'requester') or the executor's
-- record (role 'executor'). Both instances of a demo may hold the same agent_id in their own DB.
CREATE TABLE agents (
    agent_id           uuid NOT NULL,
    role               text NOT NULL CHECK (role IN ('requester', 'executor')),
    connection_id      uuid NOT NULL,
    peer_instance_id   text NOT NULL,
    workspace          text NOT NULL DEFAULT 'default',
    task_id            text NOT NULL,
    agent_type         text NOT NULL,
    context            jsonb NOT NULL,
    options            jsonb NOT NULL,
    workflow_id        text NOT NULL,
    state              text NOT NULL,
    attempt            integer NOT NULL DEFAULT 0,
    seq                bigint NOT NULL DEFAULT 0,
    progress           jsonb,
    result             jsonb,
    error              text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    finished_at        timestamptz,
    -- Requester: a kill (or an end) this side decided is being delivered to the executor
    -- (false) or the executor confirmed it (true); NULL when this side decided no end.
    kill_confirmed     boolean,
    -- Another requester may mint the same agentId: on the executor a run is its requester's.
    PRIMARY KEY (role, peer_instance_id, agent_id)
);
-- The agents this instance's users see (the ones spawned on peers and the local runs, whose
-- requester is '_local') have one id space: their views and A2A tasks are named by agentId.
CREATE UNIQUE INDEX agents_requester_id ON agents (agent_id)
    WHERE role = 'requester' OR peer_instance_id = '_local';
CREATE INDEX agents_state ON agents (state);

CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    outcome     text NOT NULL DEFAULT 'ok',
    details     jsonb NOT NULL DEFAULT '{}'::jsonb
);

-- ---- orchestration --------------------------------------------------------------
-- The requester's event log of each agent: what users follow through Server-Sent Events.
CREATE TABLE agent_events (
    id          bigserial PRIMARY KEY,
    agent_id    uuid NOT NULL,
    seq         bigint NOT NULL,
    state       text NOT NULL,
    progress    jsonb,
    error       text,
    attempt     integer,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agent_events_agent ON agent_events (agent_id, id);

CREATE INDEX agents_requester_list ON agents (role, created_at DESC);

-- ---- trust ----------------------------------------------------------------------
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

-- ---- commands -------------------------------------------------------------------
-- One-off signed commands a local user sent to a peer (POST /api/v1/federation/command), with
-- the peer's answer; a member sees those of its own workspace only.
CREATE TABLE commands (
    command_id       uuid PRIMARY KEY,
    workspace        text NOT NULL,
    actor            text NOT NULL,
    connection_id    uuid NOT NULL,
    peer_instance_id text NOT NULL,
    command_type     text NOT NULL,
    payload          jsonb NOT NULL,
    message_id       text NOT NULL,
    status           text NOT NULL CHECK (status IN ('answered', 'refused', 'failed')),
    response         jsonb,
    error            jsonb,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX commands_workspace ON commands (workspace, created_at DESC);

-- ---- spawn outbox ---------------------------------------------------------------
-- A requester answers a spawn once its row is committed; the workflow is started right after,
-- and a sweeper in every API process starts any that a crash or an outage left behind.
ALTER TABLE agents ADD COLUMN workflow_started boolean NOT NULL DEFAULT true;
CREATE INDEX agents_unstarted ON agents (created_at) WHERE NOT workflow_started;

-- ---- trace ----------------------------------------------------------------------
-- The W3C traceparent a run was spawned with, so every message of the run joins that trace.
ALTER TABLE agents ADD COLUMN traceparent text;

-- ---- durable core ---------------------------------------------------------------
-- Wake long-polls (agent.status with afterSeq) the moment a run's state changes, whoever wrote
-- it (the worker's activities, the API, the reconciler): NOTIFY fedagent_agent_state with
-- '{role}/{peer_instance_id}/{agent_id}'. Listeners also re-read on a bound, so a lost
-- notification only delays an answer.
CREATE OR REPLACE FUNCTION fedagent_agent_state_changed() RETURNS trigger AS $$
BEGIN
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        PERFORM pg_notify(
            'fedagent_agent_state',
            NEW.role || '/' || NEW.peer_instance_id || '/' || NEW.agent_id::text
        );
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS agents_state_changed ON agents;
CREATE TRIGGER agents_state_changed AFTER UPDATE OF state ON agents
    FOR EACH ROW EXECUTE FUNCTION fedagent_agent_state_changed();

-- ---- artifacts ------------------------------------------------------------------
-- Run artifacts by reference: the whole diff, the whole log (later the transcript) of a run,
-- content-addressed by sha256 and kept in chunks, so workflows and events carry only hashes,
-- sizes and bounded previews. The executor keeps what its runs produced; a requester keeps what
-- it fetched once from the executor.
CREATE TABLE artifacts (
    sha256      text PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    bytes       bigint NOT NULL CHECK (bytes >= 0),
    chunk_bytes integer NOT NULL CHECK (chunk_bytes > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE artifact_chunks (
    sha256 text NOT NULL REFERENCES artifacts (sha256) ON DELETE CASCADE,
    idx    integer NOT NULL CHECK (idx >= 0),
    data   bytea NOT NULL,
    PRIMARY KEY (sha256, idx)
);

-- Which artifact of which kind belongs to which run (same key as agents: role, peer, agent).
CREATE TABLE agent_artifacts (
    role             text NOT NULL CHECK (role IN ('requester', 'executor')),
    peer_instance_id text NOT NULL,
    agent_id         uuid NOT NULL,
    kind             text NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_-]{0,31}$'),
    sha256           text NOT NULL REFERENCES artifacts (sha256),
    bytes            bigint NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (role, peer_instance_id, agent_id, kind)
);
CREATE INDEX agent_artifacts_sha256 ON agent_artifacts (sha256);

-- The spawn outbox: one bad row cannot hold up the others. Each start attempt is counted and
-- the next one waits (backoff); every row is claimed, started and marked on its own.
ALTER TABLE agents ADD COLUMN start_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE agents ADD COLUMN next_start_at timestamptz;
ALTER TABLE agents ADD COLUMN start_error text;

-- Connections that may ask for a run's status may also fetch its artifacts (agent.artifact is
-- the status in full); an admin can take it away again with PATCH .../grants.
UPDATE connections
   SET grants = jsonb_set(grants, '{commandTypes}', (grants -> 'commandTypes') || '["agent.artifact"]')
 WHERE jsonb_typeof(grants -> 'commandTypes') = 'array'
   AND grants -> 'commandTypes' ? 'agent.status'
   AND NOT grants -> 'commandTypes' ? 'agent.artifact';

-- ---- hostile peers --------------------------------------------------------------
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

-- ---- first hour -----------------------------------------------------------------
-- What the peer of a connection allows this instance (its grants for us), as the peer last told
-- us (connection.accept, connection.grants_changed); NULL while it has not said.
ALTER TABLE connections ADD COLUMN IF NOT EXISTS peer_grants jsonb;
CREATE INDEX IF NOT EXISTS agents_hosted_list ON agents (created_at DESC) WHERE role = 'executor';

-- ---- conversation ---------------------------------------------------------------
-- Executor: the checkpointed conversation of each try of a run. A retry of the same try (its
-- worker was lost) resumes from `state`; the next try reads how this one ended (`outcome`).
CREATE TABLE agent_conversations (
    requester_id text NOT NULL,
    agent_id     uuid NOT NULL,
    attempt      integer NOT NULL,
    -- The conversation as sent to the model (messages, bounded like the tool results the
    -- model sees) and the counters that span resumes: turns, usage, retries, commands.
    state        jsonb NOT NULL,
    turn_count   integer NOT NULL DEFAULT 0,
    usage        jsonb NOT NULL DEFAULT '{}',
    tokens       bigint NOT NULL DEFAULT 0,
    checkpoints  integer NOT NULL DEFAULT 0,
    -- How the try ended: success, summary, stopReason (NULL while it runs).
    outcome      jsonb,
    -- The workspace as of this checkpoint, so a retry on another host finds it again:
    -- {"id", "sha256" (its manifest in workspace_blobs), "bytes", "entries"} or, when it
    -- could not be saved, {"id", "lost": why}. NULL: no checkpoint took one.
    workspace    jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (requester_id, agent_id, attempt)
);

-- Executor: the files of runs' workspace snapshots and their manifests, by sha256 (one copy of
-- the same bytes whichever runs and checkpoints hold them).
CREATE TABLE workspace_blobs (
    sha256     text PRIMARY KEY,
    bytes      bigint NOT NULL,
    data       bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Which run's snapshots hold which blob: when the run has ended, its rows go, and so do the
-- blobs no other run holds (federation.store.workspaces.forget_ended).
CREATE TABLE workspace_run_blobs (
    requester_id text NOT NULL,
    agent_id     uuid NOT NULL,
    sha256       text NOT NULL,
    PRIMARY KEY (requester_id, agent_id, sha256)
);
CREATE INDEX workspace_run_blobs_sha256 ON workspace_run_blobs (sha256);
-- Executor: the lists of a checkpoint that grow with the conversation (`messages`, `commands`),
-- one row per item: a save writes the items a step added or changed, not the whole list again.
CREATE TABLE agent_checkpoint_items (
    requester_id text NOT NULL,
    agent_id     uuid NOT NULL,
    attempt      integer NOT NULL,
    list         text NOT NULL,
    idx          integer NOT NULL,
    item         jsonb NOT NULL,
    PRIMARY KEY (requester_id, agent_id, attempt, list, idx),
    FOREIGN KEY (requester_id, agent_id, attempt)
        REFERENCES agent_conversations (requester_id, agent_id, attempt) ON DELETE CASCADE
);

-- Executor: the transcript of a run, numbered from 1 across its tries; bounded in bytes per run.
-- Each entry keeps the transcript's bytes up to and including it (`total_bytes`), so the
-- transcript's size is read from its last entry, not summed again at every append.
CREATE TABLE agent_transcript (
    requester_id text NOT NULL,
    agent_id     uuid NOT NULL,
    seq          integer NOT NULL,
    attempt      integer NOT NULL,
    entry        jsonb NOT NULL,
    bytes        integer NOT NULL,
    total_bytes  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (requester_id, agent_id, seq)
);

-- Requester: the transcript of each agent spawned on a peer, a gapless prefix of the executor's.
CREATE TABLE requested_transcript (
    agent_id     uuid NOT NULL,
    seq          integer NOT NULL,
    entry        jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, seq)
);

-- ---- requester limits -----------------------------------------------------------
-- Requester: each entry of a peer's transcript keeps the bytes of the copy up to and including
-- it, so the copy's size is read from its last entry (the per-run byte limit is checked on
-- every event without summing the whole copy). Entries kept before this column count 0.
ALTER TABLE requested_transcript ADD COLUMN total_bytes bigint NOT NULL DEFAULT 0;

-- Wake the event streams (SSE) of an agent when its log or its transcript grows:
-- NOTIFY fedagent_agent_news with the agent's id. PostgreSQL sends one notification per
-- transaction for the same payload, so a batch of entries wakes a stream once.
CREATE OR REPLACE FUNCTION fedagent_agent_news() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('fedagent_agent_news', NEW.agent_id::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS agent_events_news ON agent_events;
CREATE TRIGGER agent_events_news AFTER INSERT ON agent_events
    FOR EACH ROW EXECUTE FUNCTION fedagent_agent_news();

DROP TRIGGER IF EXISTS requested_transcript_news ON requested_transcript;
CREATE TRIGGER requested_transcript_news AFTER INSERT ON requested_transcript
    FOR EACH ROW EXECUTE FUNCTION fedagent_agent_news();

-- The open event streams of each API token, across every API process of the instance: a
-- stream holds a lease it renews while its token is still valid; a lease not renewed (its
-- process died) ends by itself.
CREATE TABLE event_streams (
    stream_id   uuid PRIMARY KEY,
    token_id    uuid NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
    agent_id    uuid NOT NULL,
    opened_at   timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX event_streams_token ON event_streams (token_id, expires_at);

-- Wake the streams of a token when it is revoked or its expiry changes.
CREATE OR REPLACE FUNCTION fedagent_token_changed() RETURNS trigger AS $$
BEGIN
    IF NEW.revoked_at IS DISTINCT FROM OLD.revoked_at
       OR NEW.expires_at IS DISTINCT FROM OLD.expires_at THEN
        PERFORM pg_notify('fedagent_token', NEW.id::text);
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS api_tokens_changed ON api_tokens;
CREATE TRIGGER api_tokens_changed AFTER UPDATE ON api_tokens
    FOR EACH ROW EXECUTE FUNCTION fedagent_token_changed();

-- ---- worker sandboxes -----------------------------------------------------------
-- What each worker's sandboxes cannot enforce (found at its start), so that /readyz of any API
-- replica can say it. One row per worker process; a worker refreshes seen_at while it runs and
-- removes its row when it stops; rows not seen for a while are ignored and cleaned up.
CREATE TABLE worker_sandboxes (
    worker     text PRIMARY KEY,
    host       text NOT NULL,
    sandbox    text NOT NULL,
    gaps       jsonb NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now()
);

-- ---- peer boundary --------------------------------------------------------------
-- The federation boundary (issue 18): a new key is published with an endorsement by the key it
-- replaces (peers accept no key change without one), and a stranger's connection request
-- remembers where it came from (caps per sending address and per named host, and expiry).

ALTER TABLE instance_keys ADD COLUMN endorsement jsonb;

ALTER TABLE connections ADD COLUMN request_source text;
ALTER TABLE connections ADD COLUMN request_host text;
CREATE INDEX connections_pending_inbound ON connections (created_at)
    WHERE direction = 'inbound' AND status = 'PENDING';

-- ---- once-per-instance jobs -----------------------------------------------------
-- Where each periodic job (the reconciler's walk of open runs...) stands, whichever process of
-- the instance works its next round: when a round was last worked, and the key it stopped at.
CREATE TABLE instance_jobs (
    name        text PRIMARY KEY,
    cursor      jsonb,
    last_run_at timestamptz
);

-- ---- retention ------------------------------------------------------------------
-- What ended runs leave is deleted once kept long enough (federation/store/retention.py);
-- these indexes let each pass find it without reading every row. `artifacts.created_at` is
-- when the content was last stored (a run storing bytes already kept makes it now), so content
-- about to be linked to a run is never taken for content no run refers to.
CREATE INDEX messages_created ON messages (created_at);
CREATE INDEX agents_agent_id ON agents (agent_id);
CREATE INDEX agent_events_at ON agent_events (at);
CREATE INDEX agent_artifacts_run ON agent_artifacts (agent_id);
CREATE INDEX artifacts_created ON artifacts (created_at);
