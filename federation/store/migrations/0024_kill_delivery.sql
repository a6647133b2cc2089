-- What became of an end the requester decided without the executor's word (issue 20): its
-- kill is `pending` from the moment the final is recorded (in the same statement), until the
-- executor answers: `confirmed` (it stopped the run), `too_late` (the run had ended there on
-- its own first: the requester then records that end), `not_found` (the executor has no such
-- run) or `undeliverable` (a refusal no retry can fix, or the delivery gave up; see the note).
-- The reconciler walks `pending` rows too, so a delivery that never started is started.
ALTER TABLE agents ADD COLUMN kill_delivery text
    CHECK (kill_delivery IN ('pending', 'confirmed', 'too_late', 'not_found', 'undeliverable'));
ALTER TABLE agents ADD COLUMN kill_delivery_note text;
UPDATE agents SET kill_delivery = 'pending' WHERE role = 'requester' AND kill_confirmed IS FALSE;
CREATE INDEX agents_kill_pending ON agents (role, peer_instance_id, agent_id)
    WHERE kill_delivery = 'pending';
