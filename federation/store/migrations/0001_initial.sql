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
    -- Another requester may mint the same agentId: on the executor a run is its requester's.
    PRIMARY KEY (role, peer_instance_id, agent_id)
);
CREATE UNIQUE INDEX agents_requester_id ON agents (agent_id) WHERE role = 'requester';
CREATE INDEX agents_state ON agents (state);

CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    outcome     text NOT NULL DEFAULT 'ok',
    details     jsonb NOT NULL DEFAULT '{}'::jsonb
);
