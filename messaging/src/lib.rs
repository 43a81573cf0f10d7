//! The messaging runtime, on top of the service kit (`service_kit`): the saga's wire contract on
//! Kafka and everything that keeps its delivery promises.
//!
//! - [`outbox`]: the outbox writer (an event exists if and only if its state change commits;
//!   outbox-relay reads and publishes the rows).
//! - [`consumer`]: the consumer runtime: inbox and effect in one transaction, offsets stored only
//!   after the commit, transient failures retried in place, "not yet" through the retry topics
//!   with the key parked ([`parking`], [`retry`]), the rest dead-lettered ([`dead_letter`]); what
//!   to do with each message decided in one pure place ([`decision`]). [`inbox`]: the dedupe.
//! - [`delivery`]: a record as the runtime handles it and its decoding into an [`Envelope`],
//!   within the bounds every record must keep.
//! - [`kafka`]: client settings (and the properties the promises rest on, which a user cannot
//!   change) and topic creation; [`retention`]: how long each topic keeps records and the inbox
//!   remembers messages; [`ownership`] and [`offset_gaps`]: the watchdogs that catch what the
//!   broker gets wrong.
//! - [`reader`]: a whole topic read from its beginning, for operators' tools and tests.
//! - [`service`]: the start-up and shutdown sequence every service shares.

pub mod consumer;
pub mod dead_letter;
pub mod decision;
pub mod delivery;
pub mod inbox;
pub mod kafka;
pub mod offset_gaps;
pub mod outbox;
pub mod ownership;
pub mod parking;
pub mod reader;
pub mod retention;
pub mod retry;
pub mod service;

pub use consumer::HandlerError;
pub use delivery::Envelope;

/// Migrations of the runtime's tables (outbox, inbox, parking), versions 1..49.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
