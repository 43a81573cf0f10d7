//! Per-key parking, in the service's database. While a message of a key waits in a retry topic
//! the key is parked (`parked_keys`, with the waiting message as its head), and every later
//! message of that key is stored in `parked_messages` instead of being applied; when the head is
//! finally applied or dead-lettered, the parked messages are applied in arrival order and the key
//! is released. All of it happens in transactions that lock the key's `parked_keys` row, so the
//! main consumer and the retry consumers never interleave on one key.

use schemas::headers;
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

/// Which of `keys` are parked, without locking anything.
pub async fn parked_among(
    conn: &mut PgConnection,
    group: &str,
    keys: &[String],
) -> sqlx::Result<std::collections::HashSet<String>> {
    let parked: Vec<String> = sqlx::query_scalar(
        "SELECT message_key FROM parked_keys WHERE consumer_group = $1 AND message_key = ANY($2)",
    )
    .bind(group)
    .bind(keys)
    .fetch_all(conn)
    .await?;
    Ok(parked.into_iter().collect())
}

/// The key's parking head without locking anything; `None` when the key is not parked.
pub async fn head(conn: &mut PgConnection, group: &str, key: &str) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar(
        "SELECT head_message_id FROM parked_keys WHERE consumer_group = $1 AND message_key = $2",
    )
    .bind(group)
    .bind(key)
    .fetch_optional(conn)
    .await
}

/// Parks `key` with `head` as the message waiting in the retry chain (or moves the head), storing
/// the head's record (`delivery`, as first read) for the sweep ([`expired`]).
pub async fn park_key(
    conn: &mut PgConnection,
    group: &str,
    key: &str,
    head: Uuid,
    reason: &str,
    delivery: &Delivery,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO parked_keys (consumer_group, message_key, head_message_id, reason, \
         head_topic, head_partition, head_offset, head_headers, head_payload, head_since) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, clock_timestamp()) \
         ON CONFLICT (consumer_group, message_key) DO UPDATE SET \
         head_message_id = EXCLUDED.head_message_id, reason = EXCLUDED.reason, \
         head_topic = EXCLUDED.head_topic, head_partition = EXCLUDED.head_partition, \
         head_offset = EXCLUDED.head_offset, head_headers = EXCLUDED.head_headers, \
         head_payload = EXCLUDED.head_payload, \
         head_since = CASE WHEN parked_keys.head_message_id = EXCLUDED.head_message_id \
                      THEN parked_keys.head_since ELSE EXCLUDED.head_since END",
    )
    .bind(group)
    .bind(key)
    .bind(head)
    .bind(reason)
    .bind(&delivery.topic)
    .bind(delivery.partition)
    .bind(delivery.offset)
    .bind(Json(&delivery.headers))
    .bind(delivery.payload.as_deref())
    .execute(conn)
    .await?;
    Ok(())
}

/// Restarts the `--parked-key-timeout` clock of `key` if `head` still heads it (the head moved on
/// to its next retry topic).
pub async fn touch_head(
    conn: &mut PgConnection,
    group: &str,
    key: &str,
    head: Uuid,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE parked_keys SET head_since = clock_timestamp() \
         WHERE consumer_group = $1 AND message_key = $2 AND head_message_id = $3",
    )
    .bind(group)
    .bind(key)
    .bind(head)
    .execute(conn)
    .await?;
    Ok(())
}

/// The head id of a key whose head was given up on by the sweep: it heads nothing, so every
/// retry copy of the old head is a stray and the key's parked messages can be applied.
pub const NO_HEAD: Uuid = Uuid::nil();

/// Keys of `group` parked behind the same head for longer than `older_than_secs`, or whose head
/// was given up on already (their drain was interrupted), oldest first.
pub async fn expired(
    conn: &mut PgConnection,
    group: &str,
    older_than_secs: f64,
    limit: i64,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT message_key FROM parked_keys WHERE consumer_group = $1 \
         AND (head_since < clock_timestamp() - make_interval(secs => $2) OR head_message_id = $4) \
         ORDER BY head_since LIMIT $3",
    )
    .bind(group)
    .bind(older_than_secs)
    .bind(limit)
    .bind(NO_HEAD)
    .fetch_all(conn)
    .await
}

/// Locks `key` if it is still expired and no one else holds it (`SKIP LOCKED`): its head id and
/// stored head record (`None` when the key was parked before heads were stored).
pub async fn lock_expired(
    conn: &mut PgConnection,
    group: &str,
    key: &str,
    older_than_secs: f64,
) -> sqlx::Result<Option<(Uuid, Option<Delivery>)>> {
    let row: Option<HeadRow> = sqlx::query_as(
        "SELECT head_message_id, head_topic, head_partition, head_offset, head_headers, head_payload \
         FROM parked_keys WHERE consumer_group = $1 AND message_key = $2 \
         AND (head_since < clock_timestamp() - make_interval(secs => $3) OR head_message_id = $4) \
         FOR UPDATE SKIP LOCKED",
    )
    .bind(group)
    .bind(key)
    .bind(older_than_secs)
    .bind(NO_HEAD)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|r| {
        let delivery = match (
            r.head_topic,
            r.head_partition,
            r.head_offset,
            r.head_headers,
        ) {
            (Some(topic), Some(partition), Some(offset), Some(headers)) => Some(Delivery {
                topic,
                partition,
                offset,
                timestamp: None,
                key: Some(key.as_bytes().to_vec()),
                payload: r.head_payload,
                headers: headers.0,
            }),
            _ => None,
        };
        (r.head_message_id, delivery)
    }))
}

/// Marks `key`'s head as given up on ([`NO_HEAD`]); the key stays parked until drained.
pub async fn drop_head(conn: &mut PgConnection, group: &str, key: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE parked_keys SET head_message_id = $3, reason = 'head given up on: its retry copy did not come back in time', \
         head_since = clock_timestamp() WHERE consumer_group = $1 AND message_key = $2",
    )
    .bind(group)
    .bind(key)
    .bind(NO_HEAD)
    .execute(conn)
    .await?;
    Ok(())
}

/// How many keys of `group` are parked, and how long the oldest has waited behind its head.
pub async fn stats(conn: &mut PgConnection, group: &str) -> sqlx::Result<(i64, f64)> {
    let (count, oldest): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), EXTRACT(EPOCH FROM clock_timestamp() - min(head_since))::float8 \
         FROM parked_keys WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_one(conn)
    .await?;
    Ok((count, oldest.unwrap_or(0.0)))
}

/// A record's headers, in record order, as stored (JSONB).
type Headers = Vec<(String, Option<Vec<u8>>)>;

#[derive(FromRow)]
struct HeadRow {
    head_message_id: Uuid,
    head_topic: Option<String>,
    head_partition: Option<i32>,
    head_offset: Option<i64>,
    head_headers: Option<Json<Headers>>,
    head_payload: Option<Vec<u8>>,
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
    let message_id = delivery
        .header(headers::MESSAGE_ID)
        .and_then(|id| Uuid::parse_str(id).ok());
    sqlx::query(
        "INSERT INTO parked_messages (consumer_group, message_key, topic, kafka_partition, kafka_offset, headers, payload, message_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(group)
    .bind(key)
    .bind(&delivery.topic)
    .bind(delivery.partition)
    .bind(delivery.offset)
    .bind(Json(&delivery.headers))
    .bind(delivery.payload.as_deref())
    .bind(message_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Whether `message_id` waits in `key`'s parking table.
pub async fn is_parked(
    conn: &mut PgConnection,
    group: &str,
    key: &str,
    message_id: Uuid,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM parked_messages \
         WHERE consumer_group = $1 AND message_key = $2 AND message_id = $3)",
    )
    .bind(group)
    .bind(key)
    .bind(message_id)
    .fetch_one(conn)
    .await
}

#[derive(FromRow)]
struct ParkedRow {
    id: i64,
    topic: String,
    kafka_partition: i32,
    kafka_offset: i64,
    headers: Json<Headers>,
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
                timestamp: None,
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
