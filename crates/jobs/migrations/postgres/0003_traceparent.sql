-- The W3C trace context of the span that enqueued the job (NULL when traces are
-- off): its runs continue that trace.
ALTER TABLE jobs ADD COLUMN traceparent TEXT;
