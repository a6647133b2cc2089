-- Any A2A agent as a peer (issue 23): a connection has a kind. `fedagent` peers speak
-- fedagent/1 (signed messages); an `a2a` peer is an A2A 1.0 agent added by its card URL: its
-- JSON-RPC interface and its credentials (sealed under the master key, bound to the
-- connection) are kept with it. A requester's run on an A2A peer keeps the A2A task's id.
ALTER TABLE connections ADD COLUMN kind text NOT NULL DEFAULT 'fedagent'
    CHECK (kind IN ('fedagent', 'a2a'));
ALTER TABLE connections ADD COLUMN a2a_endpoint text;
ALTER TABLE connections ADD COLUMN credentials_sealed text;
ALTER TABLE connections ADD CONSTRAINT connections_a2a_endpoint
    CHECK ((kind = 'a2a') = (a2a_endpoint IS NOT NULL));
ALTER TABLE agents ADD COLUMN remote_task_id text;
