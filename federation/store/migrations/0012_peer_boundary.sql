-- The federation boundary (issue 18): a new key is published with an endorsement by the key it
-- replaces (peers accept no key change without one), and a stranger's connection request
-- remembers where it came from (caps per sending address and per named host, and expiry).

ALTER TABLE instance_keys ADD COLUMN endorsement jsonb;

ALTER TABLE connections ADD COLUMN request_source text;
ALTER TABLE connections ADD COLUMN request_host text;
CREATE INDEX connections_pending_inbound ON connections (created_at)
    WHERE direction = 'inbound' AND status = 'PENDING';
