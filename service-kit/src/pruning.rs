//! Table pruning: the job that deletes each pruned table's rows once they are past their
//! retention, and measures every table (`db_table_rows`, the oldest row's age, the retention).
//! What a table keeps, and why that is safe, is its owner's to say (the inbox's window is the
//! messaging runtime's, `messaging::retention`; a service names its own tables).
//!
//! Rows are deleted in batches of [`BATCH`] by `ctid`, each batch its own short statement, so
//! pruning never holds long locks or a long transaction.

use std::time::Duration;

use sqlx::PgPool;

use crate::shutdown::Shutdown;

/// Rows deleted per statement.
pub const BATCH: i64 = 1_000;

/// How long a pruned table keeps its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The window [`run`] is given: for the messaging runtime, as long as a duplicate of a
    /// message can arrive (`messaging::retention::inbox_window`).
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
