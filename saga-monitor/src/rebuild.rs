//! `saga-monitor rebuild`: every projection built again, from the newest snapshot of this code's
//! version (or from the start of the topics), into tables of its own (schema [`REBUILD`]) while
//! the live projection keeps serving and advancing; once the rebuild has caught up with it, the
//! new tables are swapped in in one transaction and the old ones dropped.
//!
//! - **One at a time**: a rebuild holds a session advisory lock for as long as it runs; a second
//!   one is refused, naming the reason.
//! - **Resumable**: the rebuild's tables carry their own checkpoints, written with their rows; a
//!   rebuild killed at any moment continues from them when started again (of the same projection
//!   version; tables of another version are built again from scratch).
//! - **Two passes**: the first writes steps alone (a saga's records come in several batches, and
//!   summarizing it with each would read its steps again every time); once the steps reach the
//!   end of the log, every saga is summarized once, and from then on each batch summarizes the
//!   sagas it touches, as the live projection does.
//! - **Nothing but its own tables**: the monitor has no Kafka producer at all (its only Kafka
//!   client is [`crate::projection`]'s consumer, which commits nothing), and its only database is
//!   the monitor's own. The rebuild writes [`REBUILD`]'s tables, and the swap renames schemas.
//! - **The swap loses nothing**: it locks the live tables (the live projection's next write
//!   waits), checks that the rebuild stands at or past the live projection in every partition,
//!   and renames the schemas. The live projection then writes into the new tables from where it
//!   stood; what the rebuild already holds is a conflict that inserts nothing.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use messaging::kafka::KafkaSettings;
use service_kit::shutdown::Shutdown;
use sqlx::PgPool;

use crate::projection::{Projector, Target};
use crate::store::{self, Checkpoints, LIVE, STEP_COLUMNS};

/// The schema a rebuild builds its tables in.
pub const REBUILD: &str = "rebuild";

/// The advisory lock a rebuild holds while it runs.
const LOCK_KEY: i64 = 0x5a6a_6d6f_6e69_7472; // "Zjmonitr"

/// How often the rebuild says how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    pub from_snapshot: Option<i64>,
    pub resumed: bool,
    pub records: u64,
    pub took: Duration,
}

/// Records between the positions `rebuild` and `target`, over the partitions `target` has.
pub fn behind(rebuild: &Checkpoints, target: &Checkpoints) -> i64 {
    target
        .iter()
        .map(|(tp, &at)| (at - rebuild.get(tp).copied().unwrap_or(0)).max(0))
        .sum()
}

/// Runs a rebuild to its swap (see the module's documentation).
pub async fn run(
    pool: PgPool,
    kafka: KafkaSettings,
    max_batch: usize,
    shutdown: Shutdown,
) -> anyhow::Result<Rebuilt> {
    let started = Instant::now();
    // The lock lives as long as this connection: a rebuild killed releases it with its session.
    let mut lock = pool.acquire().await?.detach();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut lock)
        .await?;
    if !locked {
        bail!("another rebuild of this monitor's projection is running; this one does nothing");
    }
    let prepared = prepare(&pool).await?;
    let mut summarized = prepared.summarized;
    let mut projector = Projector::new(
        pool.clone(),
        &kafka,
        Target {
            schema: REBUILD.to_owned(),
            max_batch,
            summarize: summarized,
            // A rebuild reads a backlog: its batches fill without waiting.
            linger: Duration::ZERO,
        },
    )
    .await?;
    let mut records = 0_u64;
    let mut last_progress = Instant::now();
    // The end of the log as it was when the rebuild began: it reads at least that far, also
    // when no live projection runs (or it is behind).
    let mut log_end: Option<Checkpoints> = None;
    loop {
        let Some(n) = projector
            .step(Duration::from_millis(500), &shutdown)
            .await?
        else {
            bail!("stopped before the swap; run `saga-monitor rebuild` again to resume it");
        };
        records += n as u64;
        if log_end.is_none() && projector.has_listed_topics() {
            log_end = Some(projector.high_watermarks().await?);
        }
        // A full batch says more is waiting: where the live projection stands is read only
        // when the rebuild may be done (a batch that took all there was), or says how far it is.
        let progress_due = last_progress.elapsed() >= PROGRESS_EVERY;
        if n == projector.max_batch() && !progress_due {
            continue;
        }
        let live = store::checkpoints(&pool, LIVE).await?;
        let left = behind(projector.positions(), &live).max(
            log_end
                .as_ref()
                .map_or(i64::MAX, |end| behind(projector.positions(), end)),
        );
        if progress_due {
            if log_end.is_some() {
                tracing::info!(
                    records,
                    behind = left,
                    "rebuilding: {records} records projected, {left} to go (to the end of the log and the live projection)"
                );
            } else {
                tracing::info!("rebuilding: waiting for the broker to list the topics");
            }
            last_progress = Instant::now();
        }
        // Caught up: at or past the end of the log as it was when the rebuild began, and at or
        // past the live projection (also while records keep coming: the swap checks it again
        // with the live tables locked).
        if left > 0 {
            continue;
        }
        if !summarized {
            summarize(&pool).await?;
            projector.summarize_from_now_on();
            summarized = true;
            continue;
        }
        if swap(&pool).await? {
            break;
        }
    }
    let rebuilt = Rebuilt {
        from_snapshot: prepared.from_snapshot,
        resumed: prepared.resumed,
        records,
        took: started.elapsed(),
    };
    tracing::info!(
        records,
        from_snapshot = ?rebuilt.from_snapshot,
        resumed = rebuilt.resumed,
        seconds = rebuilt.took.as_secs_f64(),
        "the rebuilt projection is swapped in; the old tables are dropped"
    );
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(LOCK_KEY)
        .execute(&mut lock)
        .await;
    Ok(rebuilt)
}

/// Where a rebuild starts.
struct Prepared {
    /// Its tables were made by a rebuild killed before its swap.
    resumed: bool,
    /// The snapshot its tables were first filled from.
    from_snapshot: Option<i64>,
    /// Its summaries are made: each batch from now on recomputes those it touches.
    summarized: bool,
}

/// Makes the rebuild's tables: kept when they are of this version (a resumed rebuild), else
/// made anew, like the live ones, and filled with the steps of the newest snapshot of this
/// version when there is one.
async fn prepare(pool: &PgPool) -> anyhow::Result<Prepared> {
    let version: Option<i32> = sqlx::query_scalar("SELECT version FROM rebuild.info")
        .fetch_optional(pool)
        .await
        .or_else(|e| match &e {
            // No rebuild.info: no rebuild was started, or one was killed while it was being made.
            sqlx::Error::Database(d) if d.code().as_deref() == Some("42P01") => Ok(None),
            _ => Err(e),
        })?;
    if version == Some(crate::PROJECTION_VERSION) {
        let (from_snapshot, summarized): (Option<i64>, bool) =
            sqlx::query_as("SELECT snapshot_id, summarized FROM rebuild.info")
                .fetch_one(pool)
                .await?;
        tracing::info!("resuming the rebuild from its own checkpoints");
        return Ok(Prepared {
            resumed: true,
            from_snapshot,
            summarized,
        });
    }
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {REBUILD} CASCADE"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA {REBUILD}"))
        .execute(&mut *tx)
        .await?;
    for table in ["steps", "sagas", "checkpoints"] {
        sqlx::query(&format!(
            "CREATE TABLE {REBUILD}.{table} (LIKE {LIVE}.{table} INCLUDING ALL)"
        ))
        .execute(&mut *tx)
        .await?;
    }
    let snapshot = crate::snapshot::newest(pool).await?;
    let snapshot_id = snapshot.as_ref().map(|(id, _)| *id);
    if let Some((id, checkpoints)) = &snapshot {
        let steps = sqlx::query(&format!(
            "INSERT INTO {REBUILD}.steps ({STEP_COLUMNS})
             SELECT {STEP_COLUMNS} FROM snapshot_steps WHERE snapshot_id = $1"
        ))
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        store::advance_checkpoints(&mut tx, REBUILD, checkpoints).await?;
        tracing::info!(
            snapshot_id = id,
            steps,
            "rebuilding from the newest snapshot of this projection version"
        );
    } else {
        tracing::info!(
            "no snapshot of this projection version: rebuilding from the start of the topics"
        );
    }
    // Last, so that tables without it are known to be half made.
    sqlx::query(&format!(
        "CREATE TABLE {REBUILD}.info AS SELECT $1::int AS version, $2::bigint AS snapshot_id,
                                               now() AS started_at, false AS summarized"
    ))
    .bind(crate::PROJECTION_VERSION)
    .bind(snapshot_id)
    .execute(&mut *tx)
    .await
    .context("marking the rebuild's tables made")?;
    tx.commit().await?;
    Ok(Prepared {
        resumed: false,
        from_snapshot: snapshot_id,
        summarized: false,
    })
}

/// Summarizes every saga of the rebuild's steps, once they reach the end of the log, and marks
/// it done (a rebuild killed before the mark summarizes them all again).
async fn summarize(pool: &PgPool) -> anyhow::Result<()> {
    tracing::info!("rebuilding: every step is in; summarizing every saga");
    let started = Instant::now();
    let sagas = store::summarize_all(pool, REBUILD)
        .await
        .context("summarizing the rebuilt sagas")?;
    sqlx::query(&format!("UPDATE {REBUILD}.info SET summarized = true"))
        .execute(pool)
        .await?;
    tracing::info!(
        sagas,
        seconds = started.elapsed().as_secs_f64(),
        "rebuilding: every saga summarized; catching up with the live projection to swap"
    );
    Ok(())
}

/// Swaps the rebuilt tables in, if the rebuild stands at or past the live projection in every
/// partition once the live tables are locked; `false` (nothing changed) if the live projection
/// moved ahead meanwhile.
async fn swap(pool: &PgPool) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    // In the order the live projection's batches take them (steps, checkpoints, sagas), so that
    // a batch in flight is waited for rather than deadlocked with. Anything else that locks them
    // in another order (the prune) can still deadlock with the swap: then the swap is tried
    // again with the next batch.
    let locked = sqlx::query(&format!(
        "LOCK TABLE {LIVE}.steps, {LIVE}.checkpoints, {LIVE}.sagas IN ACCESS EXCLUSIVE MODE"
    ))
    .execute(&mut *tx)
    .await;
    if let Err(sqlx::Error::Database(e)) = &locked
        && e.code().as_deref() == Some("40P01")
    {
        tracing::info!("the swap met another transaction's locks (a deadlock); trying again");
        return Ok(false);
    }
    locked?;
    let live: Checkpoints = rows_of(&mut tx, LIVE).await?;
    let rebuilt: Checkpoints = rows_of(&mut tx, REBUILD).await?;
    if behind(&rebuilt, &live) > 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    for statement in [
        format!("DROP TABLE {REBUILD}.info"),
        format!("ALTER SCHEMA {LIVE} RENAME TO {LIVE}_old"),
        format!("ALTER SCHEMA {REBUILD} RENAME TO {LIVE}"),
        format!("DROP SCHEMA {LIVE}_old CASCADE"),
    ] {
        sqlx::query(&statement).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(true)
}

async fn rows_of(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    schema: &str,
) -> sqlx::Result<Checkpoints> {
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(&format!(
        "SELECT topic, partition, next_offset FROM {schema}.checkpoints"
    ))
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
}

/// How far a running rebuild is behind the live projection, when one has made its tables.
pub async fn progress(pool: &PgPool) -> sqlx::Result<Option<i64>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('rebuild.info') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(None);
    }
    let rebuilt = match store::checkpoints(pool, REBUILD).await {
        Ok(c) => c,
        // Swapped in between the two statements.
        Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("42P01") => return Ok(None),
        Err(e) => return Err(e),
    };
    let live = store::checkpoints(pool, LIVE).await?;
    Ok(Some(behind(&rebuilt, &live)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behind_counts_what_the_rebuild_lacks_of_each_live_partition() {
        let live: Checkpoints = [
            (("a".into(), 0), 10),
            (("a".into(), 1), 5),
            (("b".into(), 0), 3),
        ]
        .into_iter()
        .collect();
        let rebuild: Checkpoints = [(("a".into(), 0), 12), (("a".into(), 1), 2)]
            .into_iter()
            .collect();
        // a/0 ahead counts nothing, a/1 is 3 behind, b/0 not started is 3 behind.
        assert_eq!(behind(&rebuild, &live), 6);
        assert_eq!(behind(&live, &live), 0);
    }
}
