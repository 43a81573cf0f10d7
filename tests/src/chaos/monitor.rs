//! The saga monitor under the run's faults. The stack's monitor is killed (`kill -9`) among the
//! faults and meets every broker and Postgres fault the services meet; a second monitor, the
//! witness, with a database of its own, is never killed. Once the system is quiet, both must
//! have read every projected topic to its end, show every accepted order ended with the status
//! order-service gave it, and hold the same steps and the same sagas, row for row.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use uuid::Uuid;

use crate::{Stack, kafka};

/// How long both monitors have, once the system is quiet, to read what is left of the log.
const CATCH_UP_WITHIN: Duration = Duration::from_secs(120);

/// The monitor that is never killed.
pub struct Witness {
    db: String,
}

/// Starts the stack's monitor and the witness.
pub async fn start(stack: &mut Stack) -> Witness {
    stack.start_monitor().await;
    stack.spawn_monitor("witness").await;
    Witness {
        db: stack.monitor_db_of("witness"),
    }
}

/// What the monitors agreed on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Agreed {
    pub sagas: usize,
    pub steps: usize,
}

/// Waits until both monitors have caught up (see the module's documentation), then compares
/// them; the differences in words if they do not agree.
pub async fn agree(stack: &Stack, witness: &Witness, ids: &[Uuid]) -> Result<Agreed, String> {
    let monitors = [
        ("the monitor", stack.monitor_pool().await),
        ("the witness", stack.pool_of(&witness.db).await),
    ];
    let statuses: HashMap<Uuid, String> =
        sqlx::query_as("SELECT order_id, status FROM orders WHERE order_id = ANY($1)")
            .bind(ids)
            .fetch_all(&stack.orders_pool().await)
            .await
            .map_err(|e| format!("reading the orders' statuses: {e}"))?
            .into_iter()
            .collect();
    let deadline = Instant::now() + CATCH_UP_WITHIN;
    loop {
        let mut behind = Vec::new();
        match kafka::high_watermarks(&stack.broker.bootstrap).await {
            Ok(ends) => {
                for (name, pool) in &monitors {
                    match lag(pool, &ends, &statuses).await {
                        Ok(None) => {}
                        Ok(Some(why)) => behind.push(format!("{name}: {why}")),
                        Err(e) => behind.push(format!("{name}: {e}")),
                    }
                }
            }
            Err(e) => behind.push(format!("the topics' ends: {e}")),
        }
        if behind.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the saga monitors did not catch up within {CATCH_UP_WITHIN:?} of the quiet: {}",
                behind.join("; ")
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let monitor = rows(&monitors[0].1).await?;
    let witness = rows(&monitors[1].1).await?;
    let mut differences = Vec::new();
    for (key, row) in &monitor {
        match witness.get(key) {
            None => differences.push(format!("{key} only in the monitor: {row}")),
            Some(other) if other != row => {
                differences.push(format!("{key}: the monitor {row}, the witness {other}"))
            }
            Some(_) => {}
        }
    }
    for (key, row) in &witness {
        if !monitor.contains_key(key) {
            differences.push(format!("{key} only in the witness: {row}"));
        }
    }
    if !differences.is_empty() {
        return Err(format!(
            "the monitor killed during the run and the witness differ in {} rows; the first: {}",
            differences.len(),
            differences[..differences.len().min(3)].join("; ")
        ));
    }
    let count = |prefix: &str| monitor.keys().filter(|k| k.starts_with(prefix)).count();
    Ok(Agreed {
        sagas: count("saga "),
        steps: count("step "),
    })
}

/// Why the monitor of `pool` has not caught up, or `None` when it has: every projected topic
/// read at least to its end in `ends` (each topic's high watermarks summed), and every order of
/// `statuses` shown ended with its status.
async fn lag(
    pool: &PgPool,
    ends: &BTreeMap<String, i64>,
    statuses: &HashMap<Uuid, String>,
) -> anyhow::Result<Option<String>> {
    let read: HashMap<String, i64> = sqlx::query_as(
        "SELECT topic, sum(next_offset)::bigint FROM projection.checkpoints GROUP BY topic",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    for (topic, end) in ends
        .iter()
        .filter(|(t, _)| saga_monitor::step::classify(t).is_some())
    {
        let at = read.get(topic).copied().unwrap_or(0);
        if at < *end {
            return Ok(Some(format!("{topic} read to {at} of {end}")));
        }
    }
    let ids: Vec<Uuid> = statuses.keys().copied().collect();
    let shown: HashMap<Uuid, Option<String>> = sqlx::query_as(
        "SELECT order_id, status FROM projection.sagas WHERE order_id = ANY($1) AND outcome <> 'in_progress'",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    let wrong: Vec<String> = statuses
        .iter()
        .filter(|(id, status)| shown.get(*id).and_then(Option::as_deref) != Some(status.as_str()))
        .map(|(id, status)| format!("{id} ({status}) shown {:?}", shown.get(id)))
        .collect();
    Ok((!wrong.is_empty()).then(|| {
        format!(
            "{} orders not shown ended with their status, e.g. {}",
            wrong.len(),
            wrong[0]
        )
    }))
}

/// Every step (by topic, partition and offset) and every saga (by order id) of a monitor's
/// projection, as JSON text.
async fn rows(pool: &PgPool) -> Result<BTreeMap<String, String>, String> {
    sqlx::query_as(
        "SELECT 'step ' || topic || '[' || partition || ']@' || \"offset\", row_to_json(s)::text
           FROM projection.steps s
         UNION ALL
         SELECT 'saga ' || order_id, row_to_json(g)::text FROM projection.sagas g",
    )
    .fetch_all(pool)
    .await
    .map(|rows: Vec<(String, String)>| rows.into_iter().collect())
    .map_err(|e| format!("reading a monitor's projection: {e}"))
}
