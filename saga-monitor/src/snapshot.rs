//! Snapshots of the live projection (`saga-monitor snapshot`, and every `--snapshot-every`):
//! every step and the checkpoints they were projected up to, read in one consistent snapshot,
//! stamped with [`crate::PROJECTION_VERSION`]. A rebuild starts from the newest snapshot of its
//! own version, so it need not read the topics from their beginning, and can reach further back
//! than the topics keep records. The summaries are not kept: they follow from the steps.

use anyhow::Context;
use sqlx::PgPool;

use crate::store::{self, Checkpoints, STEP_COLUMNS};

/// How many snapshots of each version are kept (the newest).
pub const KEEP_PER_VERSION: i64 = 2;

/// A snapshot taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub snapshot_id: i64,
    pub steps: i64,
}

/// Takes a snapshot of the live projection, then deletes the snapshots of this version beyond
/// the newest [`KEEP_PER_VERSION`].
pub async fn take(pool: &PgPool) -> anyhow::Result<Taken> {
    let live = store::LIVE;
    let mut tx = pool.begin().await?;
    // Steps and checkpoints as of one moment: the live projection writes both in one
    // transaction, so they agree.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    let snapshot_id: i64 = sqlx::query_scalar(&format!(
        "INSERT INTO snapshots (version, checkpoints, steps)
         SELECT $1,
                (SELECT coalesce(jsonb_agg(jsonb_build_array(topic, partition, next_offset)), '[]'::jsonb)
                 FROM {live}.checkpoints),
                (SELECT count(*) FROM {live}.steps)
         RETURNING snapshot_id"
    ))
    .bind(crate::PROJECTION_VERSION)
    .fetch_one(&mut *tx)
    .await
    .context("recording the snapshot")?;
    let steps = sqlx::query(&format!(
        "INSERT INTO snapshot_steps (snapshot_id, {STEP_COLUMNS})
         SELECT $1, {STEP_COLUMNS} FROM {live}.steps"
    ))
    .bind(snapshot_id)
    .execute(&mut *tx)
    .await
    .context("copying the steps")?
    .rows_affected();
    tx.commit().await?;
    let pruned = sqlx::query(
        "DELETE FROM snapshots WHERE version = $1 AND snapshot_id NOT IN (
             SELECT snapshot_id FROM snapshots WHERE version = $1 ORDER BY snapshot_id DESC LIMIT $2)",
    )
    .bind(crate::PROJECTION_VERSION)
    .bind(KEEP_PER_VERSION)
    .execute(pool)
    .await?
    .rows_affected();
    tracing::info!(
        snapshot_id,
        steps,
        older_deleted = pruned,
        "took a snapshot of the projection"
    );
    Ok(Taken {
        snapshot_id,
        steps: steps as i64,
    })
}

/// The newest snapshot of this code's projection version: its id and checkpoints.
pub async fn newest(pool: &PgPool) -> anyhow::Result<Option<(i64, Checkpoints)>> {
    let row: Option<(i64, serde_json::Value)> = sqlx::query_as(
        "SELECT snapshot_id, checkpoints FROM snapshots WHERE version = $1
         ORDER BY snapshot_id DESC LIMIT 1",
    )
    .bind(crate::PROJECTION_VERSION)
    .fetch_optional(pool)
    .await?;
    let Some((id, json)) = row else {
        return Ok(None);
    };
    let entries: Vec<(String, i32, i64)> = serde_json::from_value(json)
        .with_context(|| format!("snapshot {id} has unreadable checkpoints"))?;
    Ok(Some((
        id,
        entries.into_iter().map(|(t, p, o)| ((t, p), o)).collect(),
    )))
}
