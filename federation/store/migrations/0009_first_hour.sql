-- What the peer of a connection allows this instance (its grants for us), as the peer last told
-- us (connection.accept, connection.grants_changed); NULL while it has not said.
ALTER TABLE connections ADD COLUMN IF NOT EXISTS peer_grants jsonb;
CREATE INDEX IF NOT EXISTS agents_hosted_list ON agents (created_at DESC) WHERE role = 'executor';
