//! The inbox: records, in the same transaction as a message's effect, that a consumer group applied
//! that message. A second delivery of the same `message-id` finds the row and is skipped.

use sqlx::PgConnection;

use crate::consumer::Envelope;

/// Records that `group` is applying `envelope`. Returns `false` when the group already applied a
/// message with this id: the caller must then roll back and skip it.
pub async fn claim(
    conn: &mut PgConnection,
    group: &str,
    envelope: &Envelope,
) -> sqlx::Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO inbox (consumer_group, message_id, event_type, topic, kafka_partition, kafka_offset) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(group)
    .bind(envelope.message_id)
    .bind(envelope.event.event_type())
    .bind(&envelope.topic)
    .bind(envelope.partition)
    .bind(envelope.offset)
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Whether `group` applied the message `message_id`.
pub async fn applied(
    conn: &mut PgConnection,
    group: &str,
    message_id: uuid::Uuid,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM inbox WHERE consumer_group = $1 AND message_id = $2)",
    )
    .bind(group)
    .bind(message_id)
    .fetch_one(conn)
    .await
}
