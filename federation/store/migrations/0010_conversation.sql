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
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (requester_id, agent_id, attempt)
);

-- Executor: the transcript of a run, numbered from 1 across its tries; bounded in bytes per run.
CREATE TABLE agent_transcript (
    requester_id text NOT NULL,
    agent_id     uuid NOT NULL,
    seq          integer NOT NULL,
    attempt      integer NOT NULL,
    entry        jsonb NOT NULL,
    bytes        integer NOT NULL,
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
