//! Per-key parking, in the service's database. While a message of a key waits in a retry topic
//! the key is parked (`parked_keys`, with the waiting message as its head), and every later
//! message of that key is stored in `parked_messages` instead of being applied; when the head is
//! finally applied or dead-lettered, the parked messages are applied in arrival order and the key
//! is released. All of it happens in transactions that lock the key's `parked_keys` row, so the
//! main consumer and the retry consumers never interleave on one key.

use sqlx::types::Json;
use sqlx::{FromRow, PgConnection};
use uuid::Uuid;

use crate::delivery::Delivery;

/// The key's parking head (the message in the retry chain), locking the key's row until the
/// transaction ends; `None` when the key is not parked.
pub async fn lock(conn: &mut PgConnection, group: &str, key: &str) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar(
        "SELECT head_message_id FROM parked_keys WHERE consumer_group = $1 AND message_key = $2 FOR UPDATE",
    )
    .bind(group)
    .bind(key)
    .fetch_optional(conn)
    .await
}

/// Parks `key` with `head` as the message waiting in the retry chain (or moves the head).
pub async fn park_key(
    conn: &mut PgConnection,
    group: &str,
    key: &str,
    head: Uuid,
    reason: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO parked_keys (consumer_group, message_key, head_message_id, reason) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (consumer_group, message_key) DO UPDATE SET head_message_id = EXCLUDED.head_message_id, \
         reason = EXCLUDED.reason",
    )
    .bind(group)
    .bind(key)
    .bind(head)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn release_key(conn: &mut PgConnection, group: &str, key: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM parked_keys WHERE consumer_group = $1 AND message_key = $2")
        .bind(group)
        .bind(key)
        .execute(conn)
        .await?;
    Ok(())
}

/// Stores a message of a parked key, behind those already waiting.
pub async fn park_message(
    conn: &mut PgConnection,
    group: &str,
    key: &str,
    delivery: &Delivery,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO parked_messages (consumer_group, message_key, topic, kafka_partition, kafka_offset, headers, payload) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(group)
    .bind(key)
    .bind(&delivery.topic)
    .bind(delivery.partition)
    .bind(delivery.offset)
    .bind(Json(&delivery.headers))
    .bind(delivery.payload.as_deref())
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(FromRow)]
struct ParkedRow {
    id: i64,
    topic: String,
    kafka_partition: i32,
    kafka_offset: i64,
    headers: Json<Vec<(String, Option<Vec<u8>>)>>,
    payload: Option<Vec<u8>>,
}

/// The oldest parked message of `key` (the caller holds the key's lock), with its row id.
pub async fn first(
    conn: &mut PgConnection,
    group: &str,
    key: &str,
) -> sqlx::Result<Option<(i64, Delivery)>> {
    let row: Option<ParkedRow> = sqlx::query_as(
        "SELECT id, topic, kafka_partition, kafka_offset, headers, payload FROM parked_messages \
         WHERE consumer_group = $1 AND message_key = $2 ORDER BY id LIMIT 1",
    )
    .bind(group)
    .bind(key)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|r| {
        (
            r.id,
            Delivery {
                topic: r.topic,
                partition: r.kafka_partition,
                offset: r.kafka_offset,
                key: Some(key.as_bytes().to_vec()),
                payload: r.payload,
                headers: r.headers.0,
            },
        )
    }))
}

pub async fn remove_message(conn: &mut PgConnection, id: i64) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM parked_messages WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}
