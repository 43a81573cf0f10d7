//! The outbox reader: the rows of a source's `outbox` table as the relay reads them (in id order,
//! late commits and holes included), the headers their records carry, and their deletion once
//! the broker has acknowledged them. The services write the rows (`messaging::outbox::append`).

use schemas::headers;
use sqlx::PgConnection;
use uuid::Uuid;

/// One outbox row as the relay publishes it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub message_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub content_type: String,
    pub payload: Vec<u8>,
    pub causation_id: Option<Uuid>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// What the next read of the outbox asks for. `Cursor::default()`: the oldest rows. Otherwise
/// the rows outside `range` (below it: commits that came late; above it: new rows) and the
/// `holes`, ids inside `range` that an earlier read did not get (their transaction had not
/// committed yet, or rolled back).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cursor {
    pub range: Option<(i64, i64)>,
    pub holes: Vec<i64>,
}

/// The next rows for `cursor` (see [`Cursor`]), at most `limit`, in id order, of the aggregate
/// types in `aggregates` only.
pub async fn read(
    conn: &mut PgConnection,
    cursor: &Cursor,
    aggregates: &[&str],
    limit: i64,
) -> sqlx::Result<Vec<OutboxRow>> {
    const COLUMNS: &str = "id, message_id, aggregate_type, aggregate_id, event_type, content_type, \
                           payload, causation_id, traceparent, tracestate, created_at";
    // Three index scans (below the range, the holes, above the range), then the lowest ids of
    // all three. Without a range, the first is the whole table and the others are empty.
    let (below, above) = cursor.range.unwrap_or((i64::MAX, i64::MAX));
    sqlx::query_as(&format!(
        "(SELECT {COLUMNS} FROM outbox WHERE id < $1 AND aggregate_type = ANY($4) ORDER BY id LIMIT $5) \
         UNION ALL \
         (SELECT {COLUMNS} FROM outbox WHERE id = ANY($2) AND aggregate_type = ANY($4)) \
         UNION ALL \
         (SELECT {COLUMNS} FROM outbox WHERE id > $3 AND aggregate_type = ANY($4) ORDER BY id LIMIT $5) \
         ORDER BY id LIMIT $5"
    ))
    .bind(below)
    .bind(&cursor.holes)
    .bind(above)
    .bind(aggregates)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Deletes the rows `ids` (published).
pub async fn delete(conn: &mut PgConnection, ids: &[i64]) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

impl OutboxRow {
    /// The record's headers (the saga's wire contract): the row's, with `traceparent` given by
    /// the publisher (its own span, a child of the row's).
    pub fn headers(&self, traceparent: &str) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (headers::MESSAGE_ID, self.message_id.to_string()),
            (headers::EVENT_TYPE, self.event_type.clone()),
            (headers::CONTENT_TYPE, self.content_type.clone()),
            (headers::CORRELATION_ID, self.aggregate_id.clone()),
        ];
        if let Some(c) = self.causation_id {
            headers.push((headers::CAUSATION_ID, c.to_string()));
        }
        headers.push((headers::TRACEPARENT, traceparent.to_owned()));
        if let Some(t) = &self.tracestate {
            headers.push((headers::TRACESTATE, t.clone()));
        }
        headers
    }

    /// [`OutboxRow::headers`] as the Kafka client takes them.
    pub fn kafka_headers(&self, traceparent: &str) -> rdkafka::message::OwnedHeaders {
        self.headers(traceparent).iter().fold(
            rdkafka::message::OwnedHeaders::new(),
            |headers, (key, value)| {
                headers.insert(rdkafka::message::Header {
                    key,
                    value: Some(value.as_str()),
                })
            },
        )
    }
}
