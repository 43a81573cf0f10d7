//! The parking side of the runtime: applying a released key's parked messages in arrival order
//! ([`Worker::resolve`]) and giving up on heads whose retry copy never comes back
//! ([`Worker::sweep`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::counter;
use schemas::headers;

use super::attempt::Tried;
use super::backoff::{Interrupted, Retrying};
use super::batch::in_savepoint;
use super::{Handler, Worker};
use crate::decision::{self, Attempt, Class, Gate, Route, Stage};
use crate::delivery::Envelope;
use crate::{inbox, parking, retry};

/// What one step of draining a released key came to.
enum Drain {
    Continue,
    /// The key is no longer parked.
    Released,
    /// A parked message said "not yet" and is now the key's head in the retry chain.
    Reparked,
}

impl<H: Handler> Worker<H> {
    /// Applies the parked messages of `key`, oldest first, and releases the key.
    pub(super) async fn resolve(&self, key: &str) -> Result<(), Interrupted> {
        loop {
            match self
                .until_done_with(Retrying::Drain { key }, || self.drain_one(key))
                .await?
            {
                Drain::Continue => {}
                Drain::Released | Drain::Reparked => return Ok(()),
            }
        }
    }

    /// Applies (or retries, or dead-letters) the oldest parked message of `key`, in one
    /// transaction with the removal of its parking row; releases the key when none is left.
    async fn drain_one(&self, key: &str) -> anyhow::Result<Drain> {
        let mut tx = self.pool.begin().await?;
        if parking::lock(&mut tx, &self.group, key).await?.is_none() {
            tx.rollback().await?;
            return Ok(Drain::Released);
        }
        let Some((id, delivery)) = parking::first(&mut tx, &self.group, key).await? else {
            parking::release_key(&mut tx, &self.group, key).await?;
            tx.commit().await?;
            tracing::info!(%key, "key released");
            return Ok(Drain::Released);
        };
        // The key's lock is held to the end; the try runs in a savepoint, so that a "not yet"
        // or a failure undoes its effects without letting another path in on this key.
        let (envelope, attempt, reason) = match Envelope::decode(&delivery) {
            Err(reason) => (None, Attempt::Undecodable, reason.to_string()),
            Ok(envelope) => {
                let started = Instant::now();
                let tried = in_savepoint(&mut tx, async |tx| {
                    let tried = self.attempt(tx, &envelope).await;
                    (tried.as_ref().is_ok_and(Tried::keeps), tried)
                })
                .await??;
                match tried {
                    Tried::Applied(after_commit) => {
                        parking::remove_message(&mut tx, id).await?;
                        tx.commit().await?;
                        self.applied(&delivery, &envelope, after_commit, started);
                        tracing::info!(message_id = %envelope.message_id,
                            event_type = envelope.event.event_type(), %key, "parked message applied");
                        return Ok(Drain::Continue);
                    }
                    Tried::Duplicate => (Some(envelope), Attempt::Duplicate, String::new()),
                    Tried::NotYet(reason) => (Some(envelope), Attempt::NotYet, reason),
                    Tried::Never(reason) => (Some(envelope), Attempt::Permanent, reason),
                }
            }
        };
        let event_type = envelope
            .as_ref()
            .map_or("unknown", |e| e.event.event_type());
        let action = decision::after(
            Stage::Parked,
            Gate::Apply,
            attempt,
            0,
            self.retry_delays.len(),
        );
        match action.route {
            Route::Done => {
                parking::remove_message(&mut tx, id).await?;
                tx.commit().await?;
                if let Some(envelope) = &envelope {
                    self.skipped_duplicate(&delivery, envelope);
                }
                Ok(Drain::Continue)
            }
            Route::Retry { attempt: next } => {
                // It becomes the key's head: re-park and send in the same transaction as its
                // removal from the parking table, the key's lock held throughout.
                let message_id = envelope.as_ref().map(|e| e.message_id).unwrap_or_default();
                parking::park_key(&mut tx, &self.group, key, message_id, &reason, &delivery)
                    .await?;
                parking::remove_message(&mut tx, id).await?;
                let delay = self.retry_delays[next - 1];
                retry::send(&self.producer, &self.group, &delivery, next, delay, &reason).await?;
                tx.commit().await?;
                tracing::info!(%message_id, event_type, %key, %reason,
                    "parked message not applicable yet; it now heads the key in the retry chain");
                Ok(Drain::Reparked)
            }
            Route::DeadLetter { class, attempts } => {
                self.dead_letter_now(&delivery, event_type, class, reason, attempts)
                    .await?;
                parking::remove_message(&mut tx, id).await?;
                tx.commit().await?;
                Ok(Drain::Continue)
            }
        }
    }

    /// At start and then every `timeout / 10` (1 s to 1 min): measures the parked keys and gives up on heads that
    /// have headed their key for longer than `timeout` (see [`Worker::sweep_once`]).
    pub(super) async fn sweep(self: Arc<Self>, timeout: Duration) {
        let every = (timeout / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            if let Err(e) = self.sweep_once(timeout).await {
                tracing::warn!(group = %self.group, error = %format!("{e:#}"),
                    "could not check the parked keys; trying again later");
            }
            if self.shutdown.sleep(every).await.is_err() {
                return;
            }
        }
    }

    /// A head whose retry copy never came back (its retry topic is no longer read after
    /// `--retry-delays` was shortened, or the copy expired with the topic's retention) would hold
    /// its key, and every later event of that order, forever. After `timeout` the head is
    /// dead-lettered from its stored record (class `retryable`, so `saga dlq redrive` can bring
    /// it back) and the key's parked messages are applied. A copy that arrives after all is a
    /// stray ([`decision::Gate::Stray`]): never applied out of order.
    async fn sweep_once(&self, timeout: Duration) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await?;
        let (parked, oldest) = parking::stats(&mut conn, &self.group).await?;
        metrics::gauge!("consumer_parked_keys", "group" => self.group.clone()).set(parked as f64);
        metrics::gauge!("consumer_parked_key_oldest_age_seconds", "group" => self.group.clone())
            .set(oldest);
        let secs = timeout.as_secs_f64();
        let keys = parking::expired(&mut conn, &self.group, secs, 100).await?;
        drop(conn);
        for key in keys {
            let mut tx = self.pool.begin().await?;
            let Some((head, record)) =
                parking::lock_expired(&mut tx, &self.group, &key, secs).await?
            else {
                continue;
            };
            // A head applied just now, whose drain has not run yet, is not given up on: its key
            // is only drained.
            let applied =
                head != parking::NO_HEAD && inbox::applied(&mut tx, &self.group, head).await?;
            if head != parking::NO_HEAD && !applied {
                let reason = format!(
                    "its retry copy did not come back within {timeout:?} (--parked-key-timeout): \
                     its retry topic is no longer read, or the copy expired"
                );
                match &record {
                    Some(delivery) => {
                        let event_type = delivery
                            .header(headers::EVENT_TYPE)
                            .unwrap_or("unknown")
                            .to_owned();
                        self.dead_letter_now(delivery, &event_type, Class::Retryable, reason, 1)
                            .await?;
                    }
                    None => tracing::error!(group = %self.group, %key, message_id = %head,
                        "a parked key's head was given up on, but its record was not stored (parked by an older version): it is not dead-lettered; find it in the retry topics"),
                }
                parking::drop_head(&mut tx, &self.group, &key).await?;
                counter!("consumer_parked_heads_expired_total", "group" => self.group.clone())
                    .increment(1);
                tracing::error!(group = %self.group, %key, message_id = %head, ?timeout,
                    "a parked key's head never came back from its retry topic; dead-lettered it, applying the key's parked messages");
            }
            tx.commit().await?;
            if self.resolve(&key).await.is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}
