//! The service kit: what a service of this system stands on that has nothing to do with Kafka.
//! The messaging runtime (`messaging`) and the processes build on it; `messaging::service` puts
//! these pieces and the consumer runtime together into a service's start-up.
//!
//! - [`http`]: problem+json answers, JSON bodies checked before a handler sees them, `/healthz`,
//!   `/readyz`, `/metrics`, the admin token, request metrics. [`http_server`]: the server with its
//!   limits (connections, in-flight requests, time, body size, slow clients).
//! - [`db`]: create the database when missing, connect, run every crate's migrations in order;
//!   which database errors are transient.
//! - [`jobs`]: work outside any consumer's transaction or later (a call to an outside API, a
//!   step's timeout), enqueued in the caller's transaction, claimed by any instance, retried,
//!   given up on with a record.
//! - [`outbound`]: calls to an outside HTTP API with timeouts, classified failures, idempotency
//!   keys, trace context and metrics; [`breaker`]: the circuit breaker in front of them.
//! - [`pruning`]: the retention job that deletes rows past their retention and measures tables.
//! - [`telemetry`]: logs, traces (OTLP) and the Prometheus recorder; [`trace_context`]: W3C
//!   `traceparent` values carried across every hop.
//! - [`process`]: a process's `main`: telemetry, settings, run, and a fatal error logged as one
//!   line.
//! - [`backoff`], [`duration`], [`shutdown`], [`text`]: the small things everything uses.
//! - `testing` (feature `testing`): a fresh database for a test.

pub mod backoff;
pub mod breaker;
pub mod db;
pub mod duration;
pub mod http;
pub mod http_server;
pub mod jobs;
pub mod outbound;
pub mod process;
pub mod pruning;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod text;
pub mod trace_context;
