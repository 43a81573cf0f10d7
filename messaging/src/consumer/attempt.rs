//! One try at one message, the same on every path (a record on its own, a record in a group
//! commit, a parked message of a released key): claim its message id in the inbox and run the
//! handler, in the caller's transaction ([`Worker::attempt`]); and once that transaction has
//! committed, what follows from it: the handler's after-commit actions, the counters and the
//! handler-duration histogram ([`Worker::applied`], [`Worker::skipped_duplicate`]).

use std::time::Instant;

use metrics::histogram;
use sqlx::PgConnection;

use super::{AfterCommit, Handler, HandlerError, Worker};
use crate::delivery::{Delivery, Envelope};
use crate::inbox;

/// What one try at a message in a transaction came to.
pub(super) enum Tried {
    /// Applied: the transaction may commit, and then the actions run.
    Applied(AfterCommit),
    /// Its message id is in the inbox: applied before. Roll back.
    Duplicate,
    /// The handler said "not yet". Roll back.
    NotYet(String),
    /// The handler said it can never apply. Roll back.
    Never(String),
}

impl Tried {
    /// Whether the transaction (or savepoint) holding the try may be kept.
    pub(super) fn keeps(&self) -> bool {
        matches!(self, Tried::Applied(_))
    }
}

impl<H: Handler> Worker<H> {
    /// Claims `envelope`'s message id in the inbox and, if it is new, applies the handler, all in
    /// the transaction open on `tx`. An error only for a transient failure (the database away):
    /// the try is then worth repeating as it is.
    pub(super) async fn attempt(
        &self,
        tx: &mut PgConnection,
        envelope: &Envelope,
    ) -> anyhow::Result<Tried> {
        if !inbox::claim(tx, &self.group, envelope).await? {
            return Ok(Tried::Duplicate);
        }
        match self.handler.handle(tx, envelope).await {
            Ok(after_commit) => Ok(Tried::Applied(after_commit)),
            Err(HandlerError::Retryable(reason)) => Ok(Tried::NotYet(reason)),
            Err(HandlerError::Permanent(reason)) => Ok(Tried::Never(reason)),
            Err(HandlerError::Transient(e)) => Err(e),
        }
    }

    /// Once the transaction that applied `envelope` has committed: runs the handler's actions
    /// and counts it, with the time since `started`.
    pub(super) fn applied(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        after_commit: AfterCommit,
        started: Instant,
    ) {
        after_commit.run();
        let event_type = envelope.event.event_type();
        self.count("consumer_messages_processed_total", delivery, event_type);
        histogram!("consumer_handler_duration_seconds", "group" => self.group.clone(),
            "topic" => self.topic_label(delivery), "event_type" => event_type)
        .record(started.elapsed().as_secs_f64());
    }

    /// A record of an event the group does not act on ([`Handler::handles`]): counted, nothing
    /// else (no inbox row: it has no effect that could be applied twice).
    pub(super) fn passed_by(&self, delivery: &Delivery, envelope: &Envelope) {
        let event_type = envelope.event.event_type();
        self.count("consumer_messages_ignored_total", delivery, event_type);
        tracing::trace!(message_id = %envelope.message_id, event_type, "not an event this group acts on; passed by");
    }

    /// A message found already applied (in the inbox): counted and logged, nothing else.
    pub(super) fn skipped_duplicate(&self, delivery: &Delivery, envelope: &Envelope) {
        let event_type = envelope.event.event_type();
        self.count("consumer_messages_duplicate_total", delivery, event_type);
        tracing::info!(message_id = %envelope.message_id, event_type, "duplicate message skipped: already applied");
    }
}
