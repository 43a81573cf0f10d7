//! The projection's tables (schema [`LIVE`]): steps, saga summaries and checkpoints, written
//! together in one transaction per batch of records, and read by the API.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::step::{Kind, Step};
use crate::summary::{self, Allowances, Outcome, Summary, Waiting};

/// The schema of the live projection's tables.
pub const LIVE: &str = "projection";

/// A partition's position: the next offset to project.
pub type Checkpoints = HashMap<(String, i32), i64>;

pub async fn checkpoints(pool: &PgPool, schema: &str) -> sqlx::Result<Checkpoints> {
    let rows = sqlx::query(&format!(
        "SELECT topic, partition, next_offset FROM {schema}.checkpoints"
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.get("topic"), r.get("partition")), r.get("next_offset")))
        .collect())
}

/// The most steps one saga keeps. A saga of this system has a few dozen at most (each event,
/// retry copy and dead letter of it); records past this under one order id (a flood produced
/// under one key) are counted and left out, so that no saga can slow the projection (each batch
/// reads every step of the sagas it touches) or swell its page without bound.
pub const MAX_STEPS_PER_SAGA: i64 = 500;

/// What one batch changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Steps new to the projection (a record seen before is none).
    pub new_steps: u64,
    pub sagas: u64,
    /// This batch's steps left out, each as its saga and kind: their sagas had
    /// [`MAX_STEPS_PER_SAGA`] steps.
    pub left_out: Vec<(Uuid, Kind)>,
}

/// Projects one batch: its steps (each record once), the checkpoints it reached (`positions`:
/// every partition read, with its next offset, including those whose records were no step),
/// and, when `summarize`, the summaries of the sagas it touched, recomputed from all their
/// steps, in one transaction. Steps of a saga that has [`MAX_STEPS_PER_SAGA`] are left out.
pub async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    steps: &[Step],
    positions: &Checkpoints,
    summarize: bool,
) -> sqlx::Result<Applied> {
    let touched: BTreeSet<Uuid> = steps.iter().map(|s| s.order_id).collect();
    let touched: Vec<Uuid> = touched.into_iter().collect();
    let (kept, left_out) = within_cap(tx, schema, &touched, steps).await?;
    let new_steps = insert_steps(tx, schema, &kept).await?;
    advance_checkpoints(tx, schema, positions).await?;
    let sagas = if summarize {
        resummarize(tx, schema, &touched).await?
    } else {
        0
    };
    Ok(Applied {
        new_steps,
        sagas,
        left_out,
    })
}

/// The steps of `steps` their sagas have room for (in the batch's order), and the saga and
/// kind of each one left out. A record seen before counts against the room too, so a saga at
/// the cap may keep a few less than [`MAX_STEPS_PER_SAGA`].
async fn within_cap<'s>(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    touched: &[Uuid],
    steps: &'s [Step],
) -> sqlx::Result<(Vec<&'s Step>, Vec<(Uuid, Kind)>)> {
    if steps.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut held: HashMap<Uuid, i64> = sqlx::query_as(&format!(
        "SELECT order_id, count(*) FROM {schema}.steps WHERE order_id = ANY($1) GROUP BY order_id"
    ))
    .bind(touched)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();
    let mut kept = Vec::with_capacity(steps.len());
    let mut left_out = Vec::new();
    for step in steps {
        let n = held.entry(step.order_id).or_insert(0);
        if *n < MAX_STEPS_PER_SAGA {
            *n += 1;
            kept.push(step);
        } else {
            left_out.push((step.order_id, step.kind));
        }
    }
    Ok((kept, left_out))
}

/// Moves each partition's checkpoint forward to `positions` (never back).
pub(crate) async fn advance_checkpoints(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    positions: &Checkpoints,
) -> sqlx::Result<()> {
    let mut topics = Vec::with_capacity(positions.len());
    let mut partitions = Vec::with_capacity(positions.len());
    let mut offsets = Vec::with_capacity(positions.len());
    for ((topic, partition), offset) in positions {
        topics.push(topic.as_str());
        partitions.push(*partition);
        offsets.push(*offset);
    }
    sqlx::query(&format!(
        "INSERT INTO {schema}.checkpoints (topic, partition, next_offset)
         SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[])
         ON CONFLICT (topic, partition)
         DO UPDATE SET next_offset = GREATEST({schema}.checkpoints.next_offset, EXCLUDED.next_offset)"
    ))
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn insert_steps(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    steps: &[&Step],
) -> sqlx::Result<u64> {
    if steps.is_empty() {
        return Ok(0);
    }
    let col = |f: fn(&Step) -> Option<String>| steps.iter().map(|s| f(s)).collect::<Vec<_>>();
    let result = sqlx::query(&format!(
        "INSERT INTO {schema}.steps (topic, partition, \"offset\", order_id, at, service, event_type,
                                     kind, message_id, causation_id, trace_id, note, decoded)
         SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::uuid[], $5::timestamptz[],
                              $6::text[], $7::text[], $8::text[], $9::uuid[], $10::uuid[],
                              $11::text[], $12::text[], $13::bool[])
         ON CONFLICT DO NOTHING"
    ))
    .bind(steps.iter().map(|s| s.topic.clone()).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.partition).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.offset).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.order_id).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| time(s.at_ms)).collect::<Vec<_>>())
    .bind(col(|s| Some(s.service.clone())))
    .bind(col(|s| s.event_type.clone()))
    .bind(col(|s| Some(s.kind.as_str().to_owned())))
    .bind(steps.iter().map(|s| s.message_id).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.causation_id).collect::<Vec<_>>())
    .bind(col(|s| s.trace_id.clone()))
    .bind(col(|s| s.note.clone()))
    .bind(steps.iter().map(|s| s.decoded).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(result.rows_affected())
}

/// Recomputes the summary of every saga in `schema`'s steps, a thousand sagas per transaction
/// (each summary stands alone: a kill midway leaves correct summaries and stale ones, never
/// wrong steps). Returns how many sagas it summarized.
pub async fn summarize_all(pool: &PgPool, schema: &str) -> sqlx::Result<u64> {
    let orders: Vec<Uuid> = sqlx::query_scalar(&format!(
        "SELECT DISTINCT order_id FROM {schema}.steps ORDER BY order_id"
    ))
    .fetch_all(pool)
    .await?;
    for chunk in orders.chunks(1000) {
        let mut tx = pool.begin().await?;
        resummarize(&mut tx, schema, chunk).await?;
        tx.commit().await?;
    }
    Ok(orders.len() as u64)
}

/// Recomputes the summaries of `orders` from their steps.
pub(crate) async fn resummarize(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    orders: &[Uuid],
) -> sqlx::Result<u64> {
    if orders.is_empty() {
        return Ok(0);
    }
    let rows = sqlx::query(&format!(
        "SELECT {STEP_COLUMNS} FROM {schema}.steps WHERE order_id = ANY($1)"
    ))
    .bind(orders)
    .fetch_all(&mut **tx)
    .await?;
    let mut by_order: HashMap<Uuid, Vec<Step>> = HashMap::new();
    for row in &rows {
        let step = step_of_row(row)?;
        by_order.entry(step.order_id).or_default().push(step);
    }
    let summaries: Vec<(Uuid, Summary)> = by_order
        .into_iter()
        .map(|(order, steps)| (order, summary::summarize(&crate::timeline::order(steps))))
        .collect();
    let result = sqlx::query(&format!(
        "INSERT INTO {schema}.sagas (order_id, status, outcome, started_at, ended_at, waiting_for,
                                     waiting_since, compensations, retries, dead_letters, steps, trace_id)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[],
                              $6::text[], $7::timestamptz[], $8::int[], $9::int[], $10::int[],
                              $11::int[], $12::text[])
         ON CONFLICT (order_id) DO UPDATE SET
             status = EXCLUDED.status, outcome = EXCLUDED.outcome, started_at = EXCLUDED.started_at,
             ended_at = EXCLUDED.ended_at, waiting_for = EXCLUDED.waiting_for,
             waiting_since = EXCLUDED.waiting_since, compensations = EXCLUDED.compensations,
             retries = EXCLUDED.retries, dead_letters = EXCLUDED.dead_letters,
             steps = EXCLUDED.steps, trace_id = EXCLUDED.trace_id"
    ))
    .bind(summaries.iter().map(|(o, _)| *o).collect::<Vec<_>>())
    .bind(
        summaries
            .iter()
            .map(|(_, s)| s.status.map(str::to_owned))
            .collect::<Vec<_>>(),
    )
    .bind(
        summaries
            .iter()
            .map(|(_, s)| s.outcome.as_str().to_owned())
            .collect::<Vec<_>>(),
    )
    .bind(
        summaries
            .iter()
            .map(|(_, s)| time(s.started_at_ms))
            .collect::<Vec<_>>(),
    )
    .bind(
        summaries
            .iter()
            .map(|(_, s)| s.ended_at_ms.map(time))
            .collect::<Vec<_>>(),
    )
    .bind(
        summaries
            .iter()
            .map(|(_, s)| s.waiting.map(|(w, _)| w.as_str().to_owned()))
            .collect::<Vec<_>>(),
    )
    .bind(
        summaries
            .iter()
            .map(|(_, s)| s.waiting.map(|(_, since)| time(since)))
            .collect::<Vec<_>>(),
    )
    .bind(
        summaries
            .iter()
            .map(|(_, s)| s.compensations)
            .collect::<Vec<_>>(),
    )
    .bind(summaries.iter().map(|(_, s)| s.retries).collect::<Vec<_>>())
    .bind(
        summaries
            .iter()
            .map(|(_, s)| s.dead_letters)
            .collect::<Vec<_>>(),
    )
    .bind(summaries.iter().map(|(_, s)| s.steps).collect::<Vec<_>>())
    .bind(
        summaries
            .iter()
            .map(|(_, s)| s.trace_id.clone())
            .collect::<Vec<_>>(),
    )
    .execute(&mut **tx)
    .await?;
    Ok(result.rows_affected())
}

pub(crate) const STEP_COLUMNS: &str = "topic, partition, \"offset\", order_id, at, service, event_type, kind, \
                            message_id, causation_id, trace_id, note, decoded";

fn step_of_row(row: &sqlx::postgres::PgRow) -> sqlx::Result<Step> {
    let kind: String = row.try_get("kind")?;
    let at: DateTime<Utc> = row.try_get("at")?;
    Ok(Step {
        order_id: row.try_get("order_id")?,
        at_ms: at.timestamp_millis(),
        service: row.try_get("service")?,
        event_type: row.try_get("event_type")?,
        kind: Kind::parse(&kind).ok_or_else(|| {
            sqlx::Error::Decode(format!("a step of unknown kind {kind:?}").into())
        })?,
        topic: row.try_get("topic")?,
        partition: row.try_get("partition")?,
        offset: row.try_get("offset")?,
        message_id: row.try_get("message_id")?,
        causation_id: row.try_get("causation_id")?,
        trace_id: row.try_get("trace_id")?,
        note: row.try_get("note")?,
        decoded: row.try_get("decoded")?,
    })
}

/// Milliseconds since the Unix epoch as a time: steps carry times within 0..=9999-12-31.
fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::UNIX_EPOCH)
}

/// A saga as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SagaView {
    pub order_id: Uuid,
    pub status: Option<String>,
    pub outcome: Outcome,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
    pub waiting_for: Option<Waiting>,
    pub waiting_since: Option<DateTime<Utc>>,
    /// Waiting for its step longer than the step's allowance.
    pub stuck: bool,
    pub compensations: i32,
    pub retries: i32,
    pub dead_letters: i32,
    pub trace_id: Option<String>,
}

/// A step as the API shows it: its place in the saga's causal order, and its time as text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepView {
    pub seq: usize,
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub step: Step,
    /// Part of a compensation (a refund, a cancellation, a release).
    pub compensation: bool,
}

/// Which sagas a list shows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub outcome: Option<Outcome>,
    /// Only the stuck ones (`Some(true)`), or only those not stuck (`Some(false)`).
    pub stuck: Option<bool>,
    pub limit: i64,
}

/// The condition "stuck" in SQL, with each step's allowance as seconds in `$1..$4`.
const STUCK: &str = "(waiting_for IS NOT NULL AND waiting_since < now() - make_interval(secs => CASE waiting_for \
                     WHEN 'reservation' THEN $1 WHEN 'payment' THEN $2 WHEN 'refund' THEN $3 ELSE $4 END))";

fn bind_allowances<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    allowances: &Allowances,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    Waiting::ALL
        .iter()
        .fold(query, |q, w| q.bind(allowances.of(*w).as_secs_f64()))
}

/// The newest sagas that pass `filter`.
pub async fn list(
    pool: &PgPool,
    allowances: &Allowances,
    filter: &Filter,
) -> sqlx::Result<Vec<SagaView>> {
    let stuck_clause = match filter.stuck {
        None => "TRUE".to_owned(),
        Some(true) => STUCK.to_owned(),
        Some(false) => format!("NOT {STUCK}"),
    };
    let query = format!(
        "SELECT *, {STUCK} AS stuck FROM {LIVE}.sagas
         WHERE ($5::text IS NULL OR outcome = $5) AND {stuck_clause}
         ORDER BY started_at DESC, order_id LIMIT $6"
    );
    let rows = bind_allowances(sqlx::query(&query), allowances)
        .bind(filter.outcome.map(Outcome::as_str))
        .bind(filter.limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(saga_of_row).collect()
}

/// One saga with its steps in causal order, if the projection has seen it.
pub async fn get(
    pool: &PgPool,
    allowances: &Allowances,
    order_id: Uuid,
) -> sqlx::Result<Option<(SagaView, Vec<StepView>)>> {
    let query = format!("SELECT *, {STUCK} AS stuck FROM {LIVE}.sagas WHERE order_id = $5");
    let Some(row) = bind_allowances(sqlx::query(&query), allowances)
        .bind(order_id)
        .fetch_optional(pool)
        .await?
    else {
        return Ok(None);
    };
    let saga = saga_of_row(&row)?;
    let rows = sqlx::query(&format!(
        "SELECT {STEP_COLUMNS} FROM {LIVE}.steps WHERE order_id = $1"
    ))
    .bind(order_id)
    .fetch_all(pool)
    .await?;
    let steps = rows
        .iter()
        .map(step_of_row)
        .collect::<sqlx::Result<Vec<_>>>()?;
    let steps = crate::timeline::order(steps)
        .into_iter()
        .enumerate()
        .map(|(i, step)| StepView {
            seq: i + 1,
            at: time(step.at_ms),
            compensation: summary::is_compensation(&step),
            step,
        })
        .collect();
    Ok(Some((saga, steps)))
}

fn saga_of_row(row: &sqlx::postgres::PgRow) -> sqlx::Result<SagaView> {
    let outcome: String = row.try_get("outcome")?;
    let waiting: Option<String> = row.try_get("waiting_for")?;
    let started_at: DateTime<Utc> = row.try_get("started_at")?;
    let ended_at: Option<DateTime<Utc>> = row.try_get("ended_at")?;
    let bad =
        |what: &str, text: &str| sqlx::Error::Decode(format!("unknown {what} {text:?}").into());
    Ok(SagaView {
        order_id: row.try_get("order_id")?,
        status: row.try_get("status")?,
        outcome: Outcome::parse(&outcome).ok_or_else(|| bad("outcome", &outcome))?,
        started_at,
        ended_at,
        duration_ms: ended_at.map(|e| (e - started_at).num_milliseconds()),
        waiting_for: match waiting.as_deref() {
            None => None,
            Some(w) => Some(Waiting::parse(w).ok_or_else(|| bad("step", w))?),
        },
        waiting_since: row.try_get("waiting_since")?,
        stuck: row.try_get("stuck")?,
        compensations: row.try_get("compensations")?,
        retries: row.try_get("retries")?,
        dead_letters: row.try_get("dead_letters")?,
        trace_id: row.try_get("trace_id")?,
    })
}

/// How many sagas there are of each outcome, and how many are stuck on each step.
pub async fn counts(
    pool: &PgPool,
    allowances: &Allowances,
) -> sqlx::Result<(HashMap<Outcome, i64>, HashMap<Waiting, i64>)> {
    let outcomes = sqlx::query(&format!(
        "SELECT outcome, count(*) AS n FROM {LIVE}.sagas GROUP BY outcome"
    ))
    .fetch_all(pool)
    .await?
    .into_iter()
    .filter_map(|r| Some((Outcome::parse(r.get("outcome"))?, r.get("n"))))
    .collect();
    let query = format!(
        "SELECT waiting_for, count(*) AS n FROM {LIVE}.sagas WHERE {STUCK} GROUP BY waiting_for"
    );
    let stuck = bind_allowances(sqlx::query(&query), allowances)
        .fetch_all(pool)
        .await?
        .into_iter()
        .filter_map(|r| Some((Waiting::parse(r.get("waiting_for"))?, r.get("n"))))
        .collect();
    Ok((outcomes, stuck))
}

/// Deletes the sagas that ended before `ended_before`, and those that never ended and started
/// before `started_before`, with their steps. Returns how many sagas went.
pub async fn prune(
    pool: &PgPool,
    ended_before: DateTime<Utc>,
    started_before: DateTime<Utc>,
) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
    let gone: Vec<Uuid> = sqlx::query_scalar(&format!(
        "DELETE FROM {LIVE}.sagas WHERE order_id IN (
             SELECT order_id FROM {LIVE}.sagas
             WHERE ended_at < $1 OR (ended_at IS NULL AND started_at < $2) LIMIT 10000)
         RETURNING order_id"
    ))
    .bind(ended_before)
    .bind(started_before)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query(&format!(
        "DELETE FROM {LIVE}.steps WHERE order_id = ANY($1)"
    ))
    .bind(&gone)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(gone.len() as u64)
}
