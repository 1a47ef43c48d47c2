-- The W3C trace context of the span that appended the event (NULL when traces
-- are off): its consumers' spans continue that trace.
ALTER TABLE events ADD COLUMN traceparent TEXT;
