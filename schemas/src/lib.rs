//! Event contracts of the order saga: the Avro schemas (`avro/*.avsc`, namespace `saga.events`),
//! the matching Rust types, and the codecs used on Kafka.
//!
//! * [`events`] owns the Rust types ([`Event`] and one struct per record) and the table of
//!   events and aggregates that every match on an event type follows from.
//! * [`registry`] owns the embedded schemas, parsed once, and their fingerprints.
//! * [`codec`] owns the wire formats: Avro single-object encoding ([`encode`], [`decode`]), JSON
//!   ([`encode_json`], [`decode_json`]) and the content-type dispatch
//!   ([`decode_with_content_type`]).
//! * [`limits`] owns the contract's bounds (money, stock, quantities, counts, text), the check of
//!   each event record against them, and [`BoundsError`].
//! * [`error`] owns [`DecodeError`].
//! * [`headers`] owns the names of the Kafka record headers.
//!
//! Type mapping: ids are `{"type":"string","logicalType":"uuid"}` in Avro and [`uuid::Uuid`] in
//! Rust. apache-avro 0.20 round-trips them cleanly through serde (a `Uuid` serializes as a string,
//! resolves to an Avro uuid, is written as the 36-character string and reads back through
//! `visit_str`), and the logical type is dropped from the parsing canonical form, so the
//! fingerprints are the same as with plain `"string"`. Times are
//! `{"type":"long","logicalType":"timestamp-millis"}` ↔ `i64` milliseconds since the Unix epoch;
//! money is `long` cents ↔ `i64`; quantities and counts are `long` ↔ `i64`;
//! `OrderCancelled.reason` is the Avro enum `CancelReason` ↔ [`CancelReason`].
//!
//! `examples/<EventType>.json` holds one valid JSON event per type (one line each, for `kcat`).
//!
//! Decoding never panics on bad input: it returns a [`DecodeError`] with a human-readable message.
//! To bound memory on corrupt length prefixes, the crate caps apache-avro's process-wide
//! allocation limit at 1 MiB per string or array block (Kafka's default maximum message size).
//! That limit is set on the first use of the schemas, and only takes effect if nothing else in the
//! process decoded Avro with apache-avro before.

pub mod codec;
pub mod error;
pub mod events;
pub mod headers;
pub mod limits;
pub mod registry;
pub mod sku;

pub use codec::{
    AVRO_CONTENT_TYPE, JSON_CONTENT_TYPE, SINGLE_OBJECT_MARKER, decode, decode_json,
    decode_with_content_type, encode, encode_json,
};
pub use error::DecodeError;
pub use events::{
    AGGREGATES, Aggregate, CancelReason, EVENT_TOPICS, Event, INVENTORY_AGGREGATE,
    INVENTORY_SERVICE, INVENTORY_TOPIC, ORDER_AGGREGATE, ORDER_SERVICE, ORDERS_TOPIC,
    OrderAwaitingPayment, OrderCancelled, OrderConfirmed, OrderItem, OrderPlaced,
    OrderRefundRequested, OrderRejected, PAYMENT_AGGREGATE, PAYMENT_SERVICE, PAYMENTS_TOPIC,
    PaymentConfirmed, PaymentDeclined, PaymentRefunded, ReservedLine, Shortage, StockReleased,
    StockReservationRejected, StockReserved, topic_for_aggregate,
};
pub use limits::BoundsError;
pub use registry::{event_type_for_fingerprint, fingerprint, schema, schema_json};
pub use sku::{MAX_SKU_LEN, SkuError, validate_sku};
pub use uuid::Uuid;
