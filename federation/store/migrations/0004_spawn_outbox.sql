-- A requester answers a spawn once its row is committed; the workflow is started right after,
-- and a sweeper in every API process starts any that a crash or an outage left behind.
ALTER TABLE agents ADD COLUMN workflow_started boolean NOT NULL DEFAULT true;
CREATE INDEX agents_unstarted ON agents (created_at) WHERE NOT workflow_started;
