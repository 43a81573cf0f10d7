//! The parts of `saga-bench` (see `src/bin/saga-bench.rs`): the machine's ceilings, the relay and
//! the saga measured against them, the processes' CPU and memory, and the saga monitor's rebuild. Nothing here asserts; every
//! function measures and returns numbers for the report.

pub mod ceilings;
pub mod monitor;
pub mod relay;
pub mod resources;
pub mod saga;
pub mod stats;

use std::time::Duration;

use serde_json::{Value, json};

/// A realistic OrderPlaced (two lines) as the services write it: the payload of the relay's rows
/// and of the raw produce ceiling's records.
pub fn order_placed_payload() -> Vec<u8> {
    schemas::encode(&schemas::Event::OrderPlaced(schemas::events::OrderPlaced {
        order_id: uuid::Uuid::new_v4(),
        customer_id: uuid::Uuid::new_v4(),
        items: vec![
            schemas::events::OrderItem {
                sku: "SKU-BENCH-0001".into(),
                quantity: 2,
            },
            schemas::events::OrderItem {
                sku: "SKU-BENCH-0002".into(),
                quantity: 1,
            },
        ],
        placed_at: chrono::Utc::now().timestamp_millis(),
    }))
}

/// A `traceparent` as the services store it with each outbox row.
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Seconds as a JSON number with millisecond precision.
pub fn secs(d: Duration) -> Value {
    json!((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// Prints a progress line (to stderr: stdout holds the results).
pub fn progress(what: impl std::fmt::Display) {
    eprintln!("[{}] {what}", chrono::Utc::now().format("%H:%M:%S"));
}
