//! Group commit: the records already read from the subscribed topics are applied in ONE
//! transaction, each with its own inbox claim, in the order they were read, so a busy consumer
//! pays one commit for many records instead of one each.
//!
//! Only what the single-record path would apply at once joins a group: a decodable record whose
//! key is not parked, and whose handler succeeds. Each record runs in a savepoint; the first one
//! that would not apply (its key is parked, it is undecodable, the handler says "not yet" or
//! "never", or anything fails) is rolled back to its savepoint, ends the group, and the group
//! before it commits. That record then goes through the single-record path ([`Worker::process`])
//! with its retries, parking and dead-lettering, and the records after it start a new group. So
//! one bad record never fails its neighbours, a key's records are still applied in order (the
//! group and the record that ended it come before everything read after them), and an offset is
//! still stored only after the transaction that applied its record committed.
//!
//! A group whose transaction fails (the database went away) applied nothing: its records, and
//! the rest of those fetched with them, go through the single-record path one by one, which
//! waits the outage out. Shutdown drops a group that has not committed (its offsets are not
//! stored, so it is read again); one caught inside its COMMIT may have applied, and the inbox
//! skips it when it is read again.

use std::time::Instant;

use metrics::histogram;
use sqlx::{Connection as _, PgConnection};
use tracing::Instrument as _;

use super::backoff::Interrupted;
use super::record::process_span;
use super::{AfterCommit, Handler, Worker};
use crate::decision::Stage;
use crate::delivery::{Delivery, Envelope};
use crate::{inbox, parking};

/// What became of one record of a group.
enum Joined {
    Applied(AfterCommit),
    /// Already applied (its message id is in the inbox): skipped.
    Duplicate,
}

impl<H: Handler> Worker<H> {
    /// Takes `records` (read in this order from the subscribed topics) to their end, in groups
    /// where it can; `done(i)` is called, in order, for each record once it is finished.
    pub(super) async fn apply_all(
        &self,
        records: &[Delivery],
        mut done: impl FnMut(usize),
    ) -> Result<(), Interrupted> {
        let mut next = 0;
        // After a group's transaction fails (the database went away), the rest of these records
        // go one by one: the single-record path waits the outage out.
        let mut grouping = true;
        while next < records.len() {
            // A group that has not committed when shutdown comes is rolled back (dropped): its
            // records' offsets are not stored, and they are read again after the restart.
            let grouped = if grouping && records.len() - next > 1 {
                tokio::select! {
                    grouped = self.group_commit(&records[next..]) => grouped,
                    _ = self.shutdown.wait() => return Err(Interrupted),
                }
            } else {
                Ok(0)
            };
            let grouped = grouped.unwrap_or_else(|e| {
                tracing::warn!(group = %self.group, error = %e,
                    "a group of records could not be applied together; applying them one by one");
                grouping = false;
                0
            });
            for i in next..next + grouped {
                done(i);
            }
            next += grouped;
            if let Some(record) = records.get(next) {
                let span = process_span(&self.group, record);
                self.process(record, Stage::Main).instrument(span).await?;
                done(next);
                next += 1;
            }
        }
        Ok(())
    }

    /// Applies the longest leading run of `records` that can join a group, in one transaction.
    /// Returns how many were applied (or skipped as duplicates) and committed; the record after
    /// them, if any, did not join. An error when the group's own transaction failed.
    async fn group_commit(&self, records: &[Delivery]) -> sqlx::Result<usize> {
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        // The keys of the records within the bounds every record must keep (a longer key, or a
        // record out of bounds, fails its decoding and ends the group anyway).
        let keys: Vec<String> = records
            .iter()
            .map_while(|r| r.check_bounds().ok().map(|()| r.key_text()))
            .collect();
        // No row is locked: only this consumer parks a key that is not parked yet, so a key found
        // free stays free until this transaction ends.
        let parked = parking::parked_among(&mut tx, &self.group, &keys).await?;
        let mut joined = Vec::new();
        for (record, key) in records.iter().zip(&keys) {
            let Ok(envelope) = Envelope::decode(record) else {
                break;
            };
            if parked.contains(key) {
                break;
            }
            let span = process_span(&self.group, record);
            match self.join(&mut tx, &envelope).instrument(span).await {
                Some(outcome) => joined.push((envelope, outcome)),
                None => break,
            }
        }
        if joined.is_empty() {
            return Ok(0);
        }
        tx.commit().await?;
        let elapsed = started.elapsed().as_secs_f64();
        let count = joined.len();
        for ((envelope, outcome), record) in joined.into_iter().zip(records) {
            let event_type = envelope.event.event_type();
            match outcome {
                Joined::Applied(after_commit) => {
                    after_commit.run();
                    self.count("consumer_messages_processed_total", record, event_type);
                    histogram!("consumer_handler_duration_seconds", "group" => self.group.clone(),
                        "topic" => envelope.topic.clone(), "event_type" => event_type)
                    .record(elapsed);
                }
                Joined::Duplicate => {
                    self.count("consumer_messages_duplicate_total", record, event_type);
                    let _span = process_span(&self.group, record).entered();
                    tracing::info!(message_id = %envelope.message_id, event_type, "duplicate message skipped: already applied");
                }
            }
        }
        tracing::debug!(group = %self.group, records = count, "applied in one transaction");
        Ok(count)
    }

    /// Claims and applies one record in a savepoint of the group's transaction; `None` (rolled
    /// back to the savepoint) when it does not join the group.
    async fn join(&self, tx: &mut PgConnection, envelope: &Envelope) -> Option<Joined> {
        let mut savepoint = tx.begin().await.ok()?;
        let outcome = match inbox::claim(&mut savepoint, &self.group, envelope).await {
            Ok(false) => Some(Joined::Duplicate),
            Ok(true) => match self.handler.handle(&mut savepoint, envelope).await {
                Ok(after_commit) => Some(Joined::Applied(after_commit)),
                Err(_) => None,
            },
            Err(_) => None,
        };
        match outcome {
            Some(Joined::Applied(after_commit)) => {
                savepoint.commit().await.ok()?;
                Some(Joined::Applied(after_commit))
            }
            // A duplicate wrote nothing; a record that did not join must leave nothing behind.
            other => {
                savepoint.rollback().await.ok()?;
                other
            }
        }
    }
}
