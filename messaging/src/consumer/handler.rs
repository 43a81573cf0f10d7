//! What a service gives the consumer runtime: a [`Handler`] that applies one message inside the
//! runtime's transaction, the [`HandlerError`] that says why it could not, and the
//! [`AfterCommit`] actions that run only once that transaction has committed.

use std::future::Future;

use schemas::Event;
use sqlx::PgConnection;

use crate::delivery::Envelope;

/// Why a handler could not apply a message.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying as it is, in place: the infrastructure is unavailable for now.
    #[error("transient failure: {0:#}")]
    Transient(anyhow::Error),
    /// Not applicable yet: retry later through the retry topics.
    #[error("not yet: {0}")]
    Retryable(String),
    /// Will never succeed: the message goes to the dead-letter topic with this reason.
    #[error("{0}")]
    Permanent(String),
}

impl From<sqlx::Error> for HandlerError {
    fn from(err: sqlx::Error) -> Self {
        if service_kit::db::is_transient(&err) {
            HandlerError::Transient(err.into())
        } else {
            HandlerError::Permanent(format!("database error: {err}"))
        }
    }
}

/// A service's reaction to the messages of its subscribed topics. `handle` runs inside the
/// transaction that also holds the inbox claim; it must do all its writes through `conn`. What it
/// returns runs only once that transaction has committed.
pub trait Handler: Send + Sync + 'static {
    /// Whether the group acts on `event` at all (the saga's services: [`schemas::Event::read_by`]).
    /// A record of an event it does not act on, read from a subscribed topic, is passed by with
    /// no transaction and no inbox row (it has no effect to apply once), and counted in
    /// `consumer_messages_ignored_total`. The default acts on every event.
    fn handles(&self, event: &Event) -> bool {
        let _ = event;
        true
    }

    fn handle(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope,
    ) -> impl Future<Output = Result<AfterCommit, HandlerError>> + Send;
}

/// What a handler leaves to do once its transaction has committed, such as counting what it
/// changed: an attempt that rolls back (and is retried) must count nothing.
#[derive(Default)]
#[must_use = "run it after the transaction commits"]
pub struct AfterCommit(Vec<Box<dyn FnOnce() + Send>>);

impl AfterCommit {
    /// Nothing to do.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds `action` to what runs after the commit.
    pub fn then(mut self, action: impl FnOnce() + Send + 'static) -> Self {
        self.0.push(Box::new(action));
        self
    }

    /// Runs every action, in the order added. Call it after the commit succeeded.
    pub fn run(self) {
        for action in self.0 {
            action();
        }
    }
}
