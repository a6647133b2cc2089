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
