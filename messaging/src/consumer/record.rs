//! One record at a time: decode it, ask its key's parking whether it may apply, apply it with its
//! inbox claim in one transaction, and carry out what [`decision::after`] says about the outcome
//! (nothing, a retry topic, the DLQ, releasing its key).

use std::time::Instant;

use chrono::Utc;
use metrics::counter;

use super::attempt::Tried;
use super::backoff::{Interrupted, Retrying};
use super::{AfterCommit, Handler, HandlerError, Worker};
use crate::dead_letter::{self, Failure};
use crate::decision::{self, Attempt, Class, Gate, Route, Stage};
use crate::delivery::{Delivery, Envelope};
use crate::{inbox, parking, retry};
use schemas::headers;

/// The OpenTelemetry consumer span of one record (`process orders.v1`), a child of the span
/// that sent it (the record's `traceparent`); what the handler writes continues this trace. Its
/// fields follow the OpenTelemetry messaging conventions; `order_id` (the key) and `trace_id`
/// go on every log line written while the record is handled.
pub(super) fn process_span(group: &str, delivery: &Delivery) -> tracing::Span {
    // Every field echoes the record: bounded, so a hostile key or header cannot bloat each log
    // line and span written while the record is handled.
    let short = |text: &str| schemas::limits::truncate_chars(text, 64);
    let original_topic = short(&delivery.origin().0);
    let key = short(&String::from_utf8_lossy(
        delivery.key.as_deref().unwrap_or_default(),
    ));
    let span = tracing::info_span!("process",
        otel.name = %format!("process {}", delivery.topic),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.destination.name = %delivery.topic,
        messaging.destination.partition.id = delivery.partition,
        messaging.kafka.offset = delivery.offset,
        messaging.kafka.message.key = %key,
        messaging.consumer.group.name = %group,
        messaging.message.id = %short(delivery.header(headers::MESSAGE_ID).unwrap_or("")),
        messaging.kafka.original_topic = %original_topic,
        order_id = %key,
        trace_id = tracing::field::Empty,
    );
    service_kit::trace_context::continue_from(&span, delivery.header(headers::TRACEPARENT));
    span
}

/// Why one try at a record in its own transaction did not apply it (or find it applied).
enum NotApplied {
    /// Its key's parking decided ([`decision::gate`]): parked, resumed, or a stray copy.
    Gated(Gate, Attempt),
    /// The handler said "not yet".
    NotYet(String),
    /// The handler, or the commit, said it can never apply.
    Never(String),
    /// Not the message's fault: worth repeating as it is.
    Transient(anyhow::Error),
}

impl From<sqlx::Error> for NotApplied {
    /// Database errors outside the handler are never the message's fault: they are retried in
    /// place (transient), so they cannot dead-letter a message or release its key.
    fn from(e: sqlx::Error) -> Self {
        NotApplied::Transient(e.into())
    }
}

impl From<anyhow::Error> for NotApplied {
    fn from(e: anyhow::Error) -> Self {
        NotApplied::Transient(e)
    }
}

impl NotApplied {
    /// A failed COMMIT of the handler's effect, classified as the handler's own database errors
    /// are ([`HandlerError`]'s `From<sqlx::Error>`).
    fn committing(e: sqlx::Error) -> Self {
        match HandlerError::from(e) {
            HandlerError::Permanent(reason) => NotApplied::Never(reason),
            HandlerError::Retryable(reason) => NotApplied::NotYet(reason),
            HandlerError::Transient(e) => NotApplied::Transient(e),
        }
    }
}

impl<H: Handler> Worker<H> {
    /// Takes one record to its end: applied, skipped, parked, sent to a retry topic or
    /// dead-lettered. `Err` only when shutdown came first (its offset must not be stored).
    pub(super) async fn process(
        &self,
        delivery: &Delivery,
        stage: Stage,
    ) -> Result<(), Interrupted> {
        let key = delivery.key_text();
        let envelope = match Envelope::decode(delivery) {
            Ok(envelope) => envelope,
            Err(reason) => {
                tracing::warn!(topic = %delivery.topic, partition = delivery.partition, offset = delivery.offset,
                    %reason, "undecodable record; dead-lettering it");
                // In a retry topic it ends its key's chain only if it heads the key.
                let id = delivery
                    .header(headers::MESSAGE_ID)
                    .and_then(|id| uuid::Uuid::parse_str(id).ok());
                let gate = match stage {
                    Stage::Retry => {
                        let head = self
                            .until_done_with(Retrying::Step, || async {
                                let mut conn = self.pool.acquire().await?;
                                Ok(parking::head(&mut conn, &self.group, &key).await?)
                            })
                            .await?;
                        decision::gate(stage, head, id)
                    }
                    _ => Gate::Apply,
                };
                return self
                    .carry_out(
                        delivery,
                        "unknown",
                        &key,
                        stage,
                        gate,
                        Attempt::Undecodable,
                        reason.to_string(),
                    )
                    .await;
            }
        };
        let event_type = envelope.event.event_type();
        // Only from the subscribed topics: a copy in a retry topic may head its key, and ends
        // its key's chain through the path below.
        if stage == Stage::Main && !self.handler.handles(&envelope.event) {
            self.passed_by(delivery, &envelope);
            return Ok(());
        }
        if stage == Stage::Retry
            && let Some(due) = retry::not_before(delivery)
        {
            // Never longer than this retry topic's delay: a forged far-future time cannot hold
            // the retry consumer.
            let wait = (due - Utc::now())
                .to_std()
                .unwrap_or_default()
                .min(self.retry_delay_of(delivery));
            if self.shutdown.sleep(wait).await.is_err() {
                return Err(Interrupted);
            }
        }
        let started = Instant::now();
        let retrying = Retrying::Record {
            delivery,
            event_type,
        };
        let (gate, attempt, reason) = self
            .until_done_with(retrying, || async {
                match self.apply_once(&envelope, delivery, &key, stage).await {
                    Ok((gate, Some(after_commit))) => {
                        self.applied(delivery, &envelope, after_commit, started);
                        Ok((gate, Attempt::Applied, String::new()))
                    }
                    Ok((gate, None)) => Ok((gate, Attempt::Duplicate, String::new())),
                    Err(NotApplied::NotYet(reason)) => Ok((Gate::Apply, Attempt::NotYet, reason)),
                    Err(NotApplied::Never(reason)) => Ok((Gate::Apply, Attempt::Permanent, reason)),
                    Err(NotApplied::Gated(gate, attempt)) => Ok((gate, attempt, String::new())),
                    Err(NotApplied::Transient(e)) => Err(e),
                }
            })
            .await?;
        match attempt {
            Attempt::Applied => {
                tracing::debug!(message_id = %envelope.message_id, event_type, %key, "applied");
            }
            Attempt::Duplicate => self.skipped_duplicate(delivery, &envelope),
            Attempt::Parked if gate == Gate::Stray => {
                tracing::info!(message_id = %envelope.message_id, event_type, %key,
                    "a retry copy of a message still waiting behind its key's head; it will be applied from the parking table");
            }
            Attempt::Parked => {
                self.count("consumer_messages_parked_total", delivery, event_type);
                tracing::info!(message_id = %envelope.message_id, event_type, %key,
                    "key is waiting for a retry; message parked behind it");
            }
            Attempt::Withheld => {
                tracing::warn!(message_id = %envelope.message_id, event_type, %key,
                    "a retry copy of a message that no longer heads its key, never applied: its chain ended through another copy; dead-lettering this one");
            }
            Attempt::Permanent => {
                tracing::warn!(message_id = %envelope.message_id, event_type, %reason,
                    "message can never apply; dead-lettering it");
            }
            Attempt::NotYet | Attempt::Undecodable => {}
        }
        let reason = match (gate, attempt) {
            (Gate::ResumeRetry, _) => "resumed after a restart".to_owned(),
            (_, Attempt::Withheld) => {
                "a retry copy whose chain already ended through another copy".to_owned()
            }
            _ => reason,
        };
        self.carry_out(delivery, event_type, &key, stage, gate, attempt, reason)
            .await
    }

    /// One try at `envelope` in one transaction: what its key's parking says ([`decision::gate`])
    /// and what came of it. The key's parking row stays locked until the transaction ends, so the
    /// main consumer, the retry consumers and a drain never interleave on one key. `Ok` with the
    /// handler's actions when it applied and committed, `Ok` with none when it was a duplicate.
    async fn apply_once(
        &self,
        envelope: &Envelope,
        delivery: &Delivery,
        key: &str,
        stage: Stage,
    ) -> Result<(Gate, Option<AfterCommit>), NotApplied> {
        let mut tx = self.pool.begin().await?;
        let head = parking::lock(&mut tx, &self.group, key).await?;
        let gate = decision::gate(stage, head, Some(envelope.message_id));
        match gate {
            Gate::Park => {
                parking::park_message(&mut tx, &self.group, key, delivery).await?;
                tx.commit().await?;
                return Err(NotApplied::Gated(gate, Attempt::Parked));
            }
            Gate::ResumeRetry => {
                tx.rollback().await?;
                return Err(NotApplied::Gated(gate, Attempt::NotYet));
            }
            Gate::Stray => {
                // Never apply a stray; only find out whether it was applied.
                let never_applied = inbox::claim(&mut tx, &self.group, envelope).await?;
                // A copy of a message still waiting in the parking table (a drain sent it to a
                // retry topic and then failed to commit) will be applied from there.
                let still_parked = never_applied
                    && parking::is_parked(&mut tx, &self.group, key, envelope.message_id).await?;
                tx.rollback().await?;
                let attempt = if still_parked {
                    Attempt::Parked
                } else if never_applied {
                    Attempt::Withheld
                } else {
                    Attempt::Duplicate
                };
                return Err(NotApplied::Gated(gate, attempt));
            }
            Gate::Apply => {}
        }
        match self.attempt(&mut tx, envelope).await? {
            Tried::Applied(after_commit) => {
                tx.commit().await.map_err(NotApplied::committing)?;
                Ok((gate, Some(after_commit)))
            }
            Tried::Duplicate => {
                tx.rollback().await?;
                Ok((gate, None))
            }
            Tried::NotYet(reason) => Err(NotApplied::NotYet(reason)),
            Tried::Never(reason) => Err(NotApplied::Never(reason)),
        }
    }

    /// Does what [`decision::after`] says: nothing, a retry topic (parking the key when the
    /// message comes from a subscribed topic), or the DLQ; then, when the message headed its key
    /// and its chain ended, applies the key's parked messages and releases it.
    #[allow(clippy::too_many_arguments)]
    async fn carry_out(
        &self,
        delivery: &Delivery,
        event_type: &'static str,
        key: &str,
        stage: Stage,
        gate: Gate,
        attempt: Attempt,
        reason: String,
    ) -> Result<(), Interrupted> {
        let so_far = match stage {
            Stage::Retry => self.attempt_of(delivery),
            Stage::Main | Stage::Parked => 0,
        };
        let action = decision::after(stage, gate, attempt, so_far, self.retry_delays.len());
        match action.route {
            Route::Done => {}
            Route::Retry { attempt: next } => {
                let delay = self.retry_delays[next - 1];
                let message_id = delivery
                    .header(headers::MESSAGE_ID)
                    .and_then(|id| uuid::Uuid::parse_str(id).ok());
                // A fresh "not yet" parks its key. A head read again from its topic
                // (ResumeRetry) already heads it: re-parking could put it back over a newer head
                // a concurrent drain just set. A head moving on to its next retry topic restarts
                // its --parked-key-timeout clock.
                if let Some(message_id) = message_id {
                    match (stage, gate) {
                        (Stage::Main, Gate::Apply) => {
                            self.until_done(|| async {
                                let mut conn = self.pool.acquire().await?;
                                parking::park_key(
                                    &mut conn,
                                    &self.group,
                                    key,
                                    message_id,
                                    &reason,
                                    delivery,
                                )
                                .await?;
                                Ok(())
                            })
                            .await?;
                        }
                        (Stage::Retry, _) => {
                            self.until_done(|| async {
                                let mut conn = self.pool.acquire().await?;
                                parking::touch_head(&mut conn, &self.group, key, message_id)
                                    .await?;
                                Ok(())
                            })
                            .await?;
                        }
                        _ => {}
                    }
                }
                self.until_done(|| async {
                    retry::send(&self.producer, &self.group, delivery, next, delay, &reason).await
                })
                .await?;
                counter!("consumer_messages_retried_total", "group" => self.group.clone(),
                    "topic" => self.topic_label(delivery), "event_type" => event_type, "attempt" => next.to_string())
                .increment(1);
                tracing::info!(message_id = ?message_id, event_type, %key, attempt = next, ?delay, %reason,
                    "not applicable yet; sent to a retry topic, its key waits");
            }
            Route::DeadLetter { class, attempts } => {
                if attempt == Attempt::NotYet {
                    tracing::warn!(event_type, %key, %reason, attempts,
                        "still not applicable after its last retry; dead-lettering it");
                }
                self.dead_letter(delivery, event_type, class, reason, attempts)
                    .await?;
            }
        }
        if action.release_key {
            if attempt == Attempt::Applied {
                tracing::info!(event_type, %key, attempt = so_far, "retried message applied; releasing its key");
            }
            self.resolve(key).await?;
        }
        Ok(())
    }

    pub(super) async fn dead_letter(
        &self,
        delivery: &Delivery,
        event_type: &str,
        class: Class,
        reason: String,
        attempts: usize,
    ) -> Result<(), Interrupted> {
        let failure = Failure {
            class,
            reason,
            attempts,
            first_failure_at: retry::first_failure_at(delivery).unwrap_or_else(Utc::now),
        };
        self.until_done(|| async {
            dead_letter::send(&self.producer, &self.group, delivery, &failure).await
        })
        .await?;
        counter!("consumer_messages_dead_lettered_total", "group" => self.group.clone(),
            "topic" => self.topic_label(delivery), "event_type" => event_type.to_owned(), "error_class" => class.as_str())
        .increment(1);
        Ok(())
    }

    /// [`Self::dead_letter`] for use inside a drain step: a failure to write is transient.
    pub(super) async fn dead_letter_now(
        &self,
        delivery: &Delivery,
        event_type: &str,
        class: Class,
        reason: String,
        attempts: usize,
    ) -> anyhow::Result<()> {
        self.dead_letter(delivery, event_type, class, reason, attempts)
            .await
            .map_err(|Interrupted| anyhow::anyhow!("shutting down"))
    }
}
