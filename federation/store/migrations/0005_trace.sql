-- The W3C traceparent a run was spawned with, so every message of the run joins that trace.
ALTER TABLE agents ADD COLUMN traceparent text;
