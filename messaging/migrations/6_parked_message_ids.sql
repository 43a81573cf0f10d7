-- The message id of each parked message, so that a retry copy of a message that is still parked
-- (sent by a drain that then failed to commit) is recognised as such and left to the parking
-- table instead of being dead-lettered as a stray.
ALTER TABLE parked_messages ADD COLUMN message_id UUID;
CREATE INDEX parked_messages_by_message ON parked_messages (consumer_group, message_key, message_id);
