//! The plumbing that order-service and inventory-service share, so that each service's code is only
//! its domain and its adapters: database setup, the transactional outbox writer, the inbox, the
//! Kafka consumer runtime (inbox + effect in one transaction, offsets stored only after commit,
//! transient failures retried in place, permanent ones dead-lettered), HTTP problem responses,
//! logs and metrics.

pub mod backoff;
pub mod consumer;
pub mod db;
pub mod dead_letter;
pub mod decision;
pub mod delivery;
pub mod http;
pub mod http_server;
pub mod inbox;
pub mod jobs;
pub mod kafka;
pub mod offset_gaps;
pub mod outbound;
pub mod outbox;
pub mod ownership;
pub mod parking;
pub mod retention;
pub mod retry;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod trace_context;

pub use consumer::HandlerError;
pub use delivery::Envelope;
