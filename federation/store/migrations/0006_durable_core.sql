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
