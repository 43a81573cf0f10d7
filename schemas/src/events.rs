//! Rust types of the saga's events: one struct per Avro record, the [`CancelReason`] enum, and
//! the [`Event`] sum type with its routing metadata (event type, order id, topic, aggregate type).
//!
//! Field names are exactly the Avro field names (and therefore the JSON field names). Ids are
//! [`Uuid`]s, times are `i64` milliseconds since the Unix epoch, money is `i64` cents and counts are
//! `i64`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Topic of the `order` aggregate: `OrderPlaced`, `OrderConfirmed`, `OrderRejected`, `OrderCancelled`.
pub const ORDERS_TOPIC: &str = "orders.v1";
/// Topic of the `inventory` aggregate: `StockReserved`, `StockReservationRejected`, `StockReleased`.
pub const INVENTORY_TOPIC: &str = "inventory.v1";
/// Aggregate type of the events on [`ORDERS_TOPIC`].
pub const ORDER_AGGREGATE: &str = "order";
/// Aggregate type of the events on [`INVENTORY_TOPIC`].
pub const INVENTORY_AGGREGATE: &str = "inventory";

/// The topic an aggregate type publishes to (`"order"` → `orders.v1`, `"inventory"` →
/// `inventory.v1`), `None` for anything else.
/// Every aggregate type an outbox row can name (each has a topic, [`topic_for_aggregate`]).
pub const AGGREGATES: [&str; 2] = [ORDER_AGGREGATE, INVENTORY_AGGREGATE];

pub fn topic_for_aggregate(aggregate_type: &str) -> Option<&'static str> {
    match aggregate_type {
        ORDER_AGGREGATE => Some(ORDERS_TOPIC),
        INVENTORY_AGGREGATE => Some(INVENTORY_TOPIC),
        _ => None,
    }
}

/// One ordered product line (Avro `saga.events.OrderItem`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderItem {
    pub sku: String,
    pub quantity: i64,
}

/// One reserved product line with its unit price (Avro `saga.events.ReservedLine`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservedLine {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// A product that lacked stock (Avro `saga.events.Shortage`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shortage {
    pub sku: String,
    pub requested: i64,
    pub available: i64,
}

/// Why an order was cancelled (Avro enum `saga.events.CancelReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CancelReason {
    CustomerRequest,
    DeadlineExceeded,
}

impl CancelReason {
    /// The Avro symbol, e.g. `"CUSTOMER_REQUEST"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::CustomerRequest => "CUSTOMER_REQUEST",
            CancelReason::DeadlineExceeded => "DEADLINE_EXCEEDED",
        }
    }
}

impl std::fmt::Display for CancelReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A customer placed an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderPlaced {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub items: Vec<OrderItem>,
    pub placed_at: i64,
}

/// The order's stock was reserved; the order is confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderConfirmed {
    pub order_id: Uuid,
    pub total_cents: i64,
    pub confirmed_at: i64,
}

/// The order was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRejected {
    pub order_id: Uuid,
    pub reason: String,
    pub rejected_at: i64,
}

/// The order was cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderCancelled {
    pub order_id: Uuid,
    pub reason: CancelReason,
    pub cancelled_at: i64,
}

/// Inventory reserved all lines of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StockReserved {
    pub order_id: Uuid,
    pub reservation_id: Uuid,
    pub lines: Vec<ReservedLine>,
    pub total_cents: i64,
    pub reserved_at: i64,
}

/// Inventory could not reserve an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StockReservationRejected {
    pub order_id: Uuid,
    pub reason: String,
    pub shortages: Vec<Shortage>,
    pub rejected_at: i64,
}

/// Inventory released a reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StockReleased {
    pub order_id: Uuid,
    pub reservation_id: Uuid,
    pub reason: String,
    pub released_at: i64,
}

/// Any event of the saga. The variant name is the Avro record name and the `event-type` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    OrderPlaced(OrderPlaced),
    OrderConfirmed(OrderConfirmed),
    OrderRejected(OrderRejected),
    OrderCancelled(OrderCancelled),
    StockReserved(StockReserved),
    StockReservationRejected(StockReservationRejected),
    StockReleased(StockReleased),
}

impl Event {
    /// Every event type (Avro record name), in declaration order.
    pub const EVENT_TYPES: [&'static str; 7] = [
        "OrderPlaced",
        "OrderConfirmed",
        "OrderRejected",
        "OrderCancelled",
        "StockReserved",
        "StockReservationRejected",
        "StockReleased",
    ];

    /// Position of this variant in [`Event::EVENT_TYPES`].
    pub(crate) fn index(&self) -> usize {
        match self {
            Event::OrderPlaced(_) => 0,
            Event::OrderConfirmed(_) => 1,
            Event::OrderRejected(_) => 2,
            Event::OrderCancelled(_) => 3,
            Event::StockReserved(_) => 4,
            Event::StockReservationRejected(_) => 5,
            Event::StockReleased(_) => 6,
        }
    }

    /// The Avro record name, e.g. `"OrderPlaced"` (the `event-type` header value).
    pub fn event_type(&self) -> &'static str {
        Self::EVENT_TYPES[self.index()]
    }

    /// The order the event belongs to (the record key and `correlation-id`).
    pub fn order_id(&self) -> Uuid {
        match self {
            Event::OrderPlaced(e) => e.order_id,
            Event::OrderConfirmed(e) => e.order_id,
            Event::OrderRejected(e) => e.order_id,
            Event::OrderCancelled(e) => e.order_id,
            Event::StockReserved(e) => e.order_id,
            Event::StockReservationRejected(e) => e.order_id,
            Event::StockReleased(e) => e.order_id,
        }
    }

    /// `"order"` for `Order*` events, `"inventory"` for `Stock*` events.
    pub fn aggregate_type(&self) -> &'static str {
        match self {
            Event::OrderPlaced(_)
            | Event::OrderConfirmed(_)
            | Event::OrderRejected(_)
            | Event::OrderCancelled(_) => ORDER_AGGREGATE,
            Event::StockReserved(_)
            | Event::StockReservationRejected(_)
            | Event::StockReleased(_) => INVENTORY_AGGREGATE,
        }
    }

    /// [`ORDERS_TOPIC`] for `Order*` events, [`INVENTORY_TOPIC`] for `Stock*` events.
    pub fn topic(&self) -> &'static str {
        match self.aggregate_type() {
            ORDER_AGGREGATE => ORDERS_TOPIC,
            _ => INVENTORY_TOPIC,
        }
    }
}

macro_rules! impl_from {
    ($($name:ident),* $(,)?) => {$(
        impl From<$name> for Event {
            fn from(event: $name) -> Self {
                Event::$name(event)
            }
        }
    )*};
}

impl_from!(
    OrderPlaced,
    OrderConfirmed,
    OrderRejected,
    OrderCancelled,
    StockReserved,
    StockReservationRejected,
    StockReleased,
);
