-- A read model being rebuilt from the log (`scaleshop projections rebuild`): the
-- head of the log when its table was emptied. Reads are not served by it until
-- its position reaches this again; NULL when it is not being rebuilt.
ALTER TABLE event_consumers ADD COLUMN rebuild_to BIGINT;
