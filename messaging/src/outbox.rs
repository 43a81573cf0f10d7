//! The outbox writer: appends an event to the `outbox` table inside the caller's transaction, so the
//! event exists if and only if the state change that produced it commits. outbox-relay reads and
//! publishes it (`outbox-relay/src/outbox.rs`).

use schemas::Event;
use sqlx::PgConnection;
use uuid::Uuid;

/// Where an event came from: the message that caused it (absent for HTTP-originated events) and the
/// trace it belongs to.
#[derive(Debug, Clone, Default)]
pub struct Cause {
    pub causation_id: Option<Uuid>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// Appends `event` to the outbox in the caller's transaction and returns its message id (the
/// `message-id` header, and the consumers' inbox key). Ids are UUIDv7 so they sort by time.
pub async fn append(conn: &mut PgConnection, event: &Event, cause: &Cause) -> sqlx::Result<Uuid> {
    let message_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, content_type, \
         payload, causation_id, traceparent, tracestate) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(message_id)
    .bind(event.aggregate_type())
    .bind(event.order_id().to_string())
    .bind(event.event_type())
    .bind(schemas::AVRO_CONTENT_TYPE)
    .bind(schemas::encode(event))
    .bind(cause.causation_id)
    .bind(cause.traceparent.as_deref())
    .bind(cause.tracestate.as_deref())
    .execute(conn)
    .await?;
    Ok(message_id)
}
