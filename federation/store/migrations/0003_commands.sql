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
