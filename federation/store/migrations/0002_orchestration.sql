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
