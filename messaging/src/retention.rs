//! Retention: how long each table and topic keeps what it holds, and the job that prunes the
//! tables and measures them.
//!
//! **Topics** are created with an explicit `retention.ms` (and a `segment.ms` no longer than it,
//! so that a record outlives its retention by at most one segment): the event topics
//! `--topic-retention` (7 days), the retry topics `--retry-topic-retention` (7 days, far above
//! their delays), the dead-letter topics `--dlq-retention` (28 days: dead letters are evidence).
//! Topics that already exist are not changed; a different retention is logged at start.
//!
//! **The inbox** must remember a message for as long as a copy of it can still arrive, or a late
//! duplicate would be applied twice. A copy can come from any topic the group reads (its
//! subscribed topic, its retry topics) or from its DLQ (`saga dlq redrive`), for as long as that
//! topic keeps it: at most twice its retention (see above). So the inbox keeps a row for
//! `max(--inbox-retention, 2 × the longest of those retentions)`, from the retentions the broker
//! reports at start. When the broker does not report one (or keeps records for ever), the inbox
//! is not pruned at all, and `db_table_retention_seconds{table="inbox"}` says so with -1.
//! Inventory's `cancelled_orders` (a cancellation seen before its OrderPlaced) keeps the same
//! window: an OrderPlaced can arrive for as long as a duplicate can.
//!
//! Rows are deleted in batches of [`BATCH`] by `ctid`, each batch its own short statement, so
//! pruning never holds long locks or a long transaction.

use std::time::Duration;

use sqlx::PgPool;

use crate::kafka::Retention;
use crate::shutdown::Shutdown;

/// Rows deleted per statement.
pub const BATCH: i64 = 1_000;

/// How long a pruned table keeps its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// As long as a duplicate of a message can arrive ([`inbox_window`]).
    DuplicateWindow,
    /// A fixed time (for example the idempotency keys' lifetime).
    For(Duration),
}

/// A table the job prunes: rows whose `time_column` is older than `keep` are deleted.
#[derive(Debug, Clone, Copy)]
pub struct PrunedTable {
    pub table: &'static str,
    pub time_column: &'static str,
    pub keep: Keep,
}

/// Settings every service has for its topics and its inbox.
#[derive(Debug, Clone, clap::Args)]
pub struct RetentionSettings {
    #[command(flatten)]
    pub topics: TopicRetention,
    /// How long the retry topics this service creates keep their records.
    #[arg(long, env = "RETRY_TOPIC_RETENTION", default_value = "7d", value_parser = crate::retry::parse_duration)]
    pub retry_topic_retention: Duration,
    /// How long the dead-letter topic this service creates keeps its records.
    #[arg(long, env = "DLQ_RETENTION", default_value = "28d", value_parser = crate::retry::parse_duration)]
    pub dlq_retention: Duration,
    /// The least time the inbox remembers an applied message; it keeps rows longer when the
    /// topics keep records longer (twice the longest retention of the topics a copy can come
    /// from).
    #[arg(long, env = "INBOX_RETENTION", default_value = "1d", value_parser = crate::retry::parse_duration)]
    pub inbox_retention: Duration,
}

/// The event topics' retention, which the relay sets too (whoever creates them first).
#[derive(Debug, Clone, clap::Args)]
pub struct TopicRetention {
    /// How long the event topics (orders.v1, inventory.v1) keep their records when this process
    /// creates them.
    #[arg(long, env = "TOPIC_RETENTION", default_value = "7d", value_parser = crate::retry::parse_duration)]
    pub topic_retention: Duration,
}

impl TopicRetention {
    /// The event topics, as a process creates them when they are missing.
    pub fn event_topics(&self) -> Vec<crate::kafka::TopicSpec> {
        schemas::EVENT_TOPICS
            .iter()
            .map(|t| crate::kafka::TopicSpec::new(*t, self.topic_retention))
            .collect()
    }
}

/// How long the inbox must remember a message, given the retention of every topic a copy of it
/// can come from: `max(floor, 2 × the longest)`. `Err` says why it cannot be known (a retention
/// the broker did not report, or records kept for ever): then nothing may be pruned.
pub fn inbox_window(floor: Duration, sources: &[(String, Retention)]) -> Result<Duration, String> {
    let mut longest = Duration::ZERO;
    for (topic, retention) in sources {
        match retention {
            Retention::Millis(ms) => longest = longest.max(Duration::from_millis(*ms)),
            Retention::Forever => return Err(format!("{topic} keeps its records for ever")),
            Retention::Unknown => {
                return Err(format!(
                    "the broker did not report the retention of {topic}"
                ));
            }
        }
    }
    Ok(floor.max(longest.saturating_mul(2)))
}

/// Prunes `tables` (with the duplicate window `window`, `None` when it is unknown) and measures
/// every table of the database until `shutdown` fires.
pub async fn run(
    pool: PgPool,
    tables: Vec<PrunedTable>,
    window: Option<Duration>,
    shutdown: Shutdown,
) {
    let keeps: Vec<(PrunedTable, Option<Duration>)> = tables
        .into_iter()
        .map(|t| {
            let keep = match t.keep {
                Keep::DuplicateWindow => window,
                Keep::For(d) => Some(d),
            };
            (t, keep)
        })
        .collect();
    for (t, keep) in &keeps {
        metrics::counter!("db_rows_pruned_total", "table" => t.table).absolute(0);
        metrics::gauge!("db_table_retention_seconds", "table" => t.table)
            .set(keep.map_or(-1.0, |k| k.as_secs_f64()));
        match keep {
            Some(keep) => {
                tracing::info!(table = t.table, ?keep, "rows older than this are deleted")
            }
            None => {
                tracing::warn!(
                    table = t.table,
                    "not pruned: the retention of the topics its messages come from is not known"
                )
            }
        }
    }
    // Often enough that a table holds little more than its retention.
    let every = keeps
        .iter()
        .filter_map(|(_, k)| *k)
        .min()
        .map_or(Duration::from_secs(60), |k| k / 10)
        .clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        for (t, keep) in &keeps {
            if let Some(keep) = keep
                && let Err(e) = prune(&pool, t, *keep, &shutdown).await
            {
                tracing::warn!(table = t.table, error = %e, "could not prune; trying again later");
            }
        }
        if let Err(e) = measure(&pool, &keeps).await {
            tracing::debug!(error = %e, "could not measure the tables");
        }
        if shutdown.sleep(every).await.is_err() {
            return;
        }
    }
}

/// Deletes the rows of `t` older than `keep`, [`BATCH`] at a time.
async fn prune(
    pool: &PgPool,
    t: &PrunedTable,
    keep: Duration,
    shutdown: &Shutdown,
) -> sqlx::Result<()> {
    let sql = format!(
        "DELETE FROM {table} WHERE ctid = ANY(ARRAY( \
            SELECT ctid FROM {table} WHERE {column} < now() - make_interval(secs => $1) LIMIT $2))",
        table = t.table,
        column = t.time_column
    );
    let mut total = 0u64;
    loop {
        let deleted = sqlx::query(&sql)
            .bind(keep.as_secs_f64())
            .bind(BATCH)
            .execute(pool)
            .await?
            .rows_affected();
        total += deleted;
        if deleted < BATCH as u64 || shutdown.is_fired() {
            break;
        }
        // Let other work in between batches.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if total > 0 {
        metrics::counter!("db_rows_pruned_total", "table" => t.table).increment(total);
        tracing::info!(
            table = t.table,
            rows = total,
            ?keep,
            "pruned rows past their retention"
        );
    }
    Ok(())
}

/// `db_table_rows{table}` for every table of the database (the statistics' live-row estimate:
/// no count scans), and `db_table_oldest_row_age_seconds{table}` for the pruned tables.
async fn measure(pool: &PgPool, keeps: &[(PrunedTable, Option<Duration>)]) -> sqlx::Result<()> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT relname::text, n_live_tup FROM pg_stat_user_tables WHERE schemaname = 'public' \
         AND relname <> '_sqlx_migrations'",
    )
    .fetch_all(pool)
    .await?;
    for (table, n) in rows {
        metrics::gauge!("db_table_rows", "table" => table).set(n as f64);
    }
    for (t, _) in keeps {
        let sql = format!(
            "SELECT COALESCE(EXTRACT(EPOCH FROM now() - min({column}))::float8, 0) FROM {table}",
            table = t.table,
            column = t.time_column
        );
        let age: f64 = sqlx::query_scalar(&sql).fetch_one(pool).await?;
        metrics::gauge!("db_table_oldest_row_age_seconds", "table" => t.table).set(age);
    }
    Ok(())
}

/// Describes the retention job's metrics.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_gauge!(
        "db_table_rows",
        "Rows of each table of the service's database (the statistics' live-row estimate)"
    );
    describe_gauge!(
        "db_table_oldest_row_age_seconds",
        Unit::Seconds,
        "Age of the oldest row of each pruned table"
    );
    describe_gauge!(
        "db_table_retention_seconds",
        Unit::Seconds,
        "How long each pruned table keeps its rows; -1 when it is not pruned (the retention of the topics its messages come from is not known)"
    );
    describe_counter!(
        "db_rows_pruned_total",
        "Rows deleted by the retention job, by table"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn days(n: u64) -> Duration {
        Duration::from_secs(n * 86_400)
    }

    #[test]
    fn the_inbox_outlives_every_copy_a_topic_can_still_hold() {
        let sources = [
            ("orders.v1".to_owned(), Retention::Millis(7 * 86_400_000)),
            ("g.dlq".to_owned(), Retention::Millis(28 * 86_400_000)),
        ];
        assert_eq!(inbox_window(days(1), &sources), Ok(days(56)));
        assert_eq!(inbox_window(days(90), &sources), Ok(days(90)));
    }

    #[test]
    fn an_unknown_or_endless_retention_turns_pruning_off() {
        let forever = [("g.dlq".to_owned(), Retention::Forever)];
        assert!(
            inbox_window(days(1), &forever)
                .unwrap_err()
                .contains("for ever")
        );
        let unknown = [
            ("orders.v1".to_owned(), Retention::Millis(1)),
            ("g.retry.1".to_owned(), Retention::Unknown),
        ];
        assert!(
            inbox_window(days(1), &unknown)
                .unwrap_err()
                .contains("g.retry.1")
        );
    }
}
