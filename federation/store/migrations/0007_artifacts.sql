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
