//! Rust types of the saga's events: one struct per Avro record, the [`CancelReason`] enum, and
//! the [`Event`] sum type with its routing metadata (event type, order id, topic, aggregate).
//!
//! Two tables at the end of this file say everything else about an event: `aggregates!` lists
//! each aggregate with its name and topic, and `events!` lists each event with its aggregate.
//! Every match on an event type follows from them (the [`Event`] enum, its event type, order id,
//! aggregate and topic, the embedded schema `avro/<EventType>.avsc`, the codecs' dispatch, the
//! contract check), so adding an event is its struct, its schema file, its bounds
//! ([`crate::limits::WithinContract`]) and one row; an event without an aggregate, a schema or
//! bounds does not compile, and routing has no fallback arm.
//!
//! Field names are exactly the Avro field names (and therefore the JSON field names). Ids are
//! [`Uuid`]s, times are `i64` milliseconds since the Unix epoch, money is `i64` cents and counts are
//! `i64`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

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
    PaymentDeclined,
    PaymentTimeout,
}

impl CancelReason {
    pub const ALL: [CancelReason; 4] = [
        CancelReason::CustomerRequest,
        CancelReason::DeadlineExceeded,
        CancelReason::PaymentDeclined,
        CancelReason::PaymentTimeout,
    ];

    /// The reason whose Avro symbol is `symbol`; `None` for a symbol this code does not know.
    pub fn from_symbol(symbol: &str) -> Option<CancelReason> {
        CancelReason::ALL.into_iter().find(|r| r.as_str() == symbol)
    }

    /// The Avro symbol, e.g. `"CUSTOMER_REQUEST"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::CustomerRequest => "CUSTOMER_REQUEST",
            CancelReason::DeadlineExceeded => "DEADLINE_EXCEEDED",
            CancelReason::PaymentDeclined => "PAYMENT_DECLINED",
            CancelReason::PaymentTimeout => "PAYMENT_TIMEOUT",
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

/// The order's stock is reserved; it waits for its payment until `pay_by`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderAwaitingPayment {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub amount_cents: i64,
    pub pay_by: i64,
    pub at: i64,
}

/// The order is being cancelled after its payment was asked for: refund what was charged, or
/// void what was not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRefundRequested {
    pub order_id: Uuid,
    pub amount_cents: i64,
    pub reason: CancelReason,
    pub requested_at: i64,
}

/// The order is paid for and its stock reserved: the order is confirmed.
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

/// The order's payment was charged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentConfirmed {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub amount_cents: i64,
    pub confirmed_at: i64,
}

/// The processor declined the order's payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentDeclined {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub reason: String,
    pub decline_code: String,
    pub declined_at: i64,
}

/// The order's payment was refunded in full (`refunded_cents`), or voided before it was charged
/// (`refunded_cents` 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentRefunded {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub refunded_cents: i64,
    pub refunded_at: i64,
}

/// Declares the aggregates: each with the name outbox rows carry in `aggregate_type` and the
/// topic its events go to.
macro_rules! aggregates {
    ($($(#[$doc:meta])* $variant:ident = $name:literal on $topic_const:ident = $topic:literal, $name_const:ident;)*) => {
        $(
            #[doc = concat!("Topic of the `", $name, "` aggregate.")]
            pub const $topic_const: &str = $topic;
            #[doc = concat!("Aggregate type (outbox `aggregate_type`) of the events on `", $topic, "`.")]
            pub const $name_const: &str = $name;
        )*

        /// The kind of entity whose events share a topic (all keyed by order id).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Aggregate {
            $($(#[$doc])* $variant,)*
        }

        impl Aggregate {
            /// Every aggregate, in declaration order.
            pub const ALL: [Aggregate; [$($name),*].len()] = [$(Aggregate::$variant),*];

            /// The name outbox rows carry in `aggregate_type`, e.g. `"order"`.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Aggregate::$variant => $name,)*
                }
            }

            /// The topic the aggregate's events go to, e.g. `orders.v1`.
            pub const fn topic(self) -> &'static str {
                match self {
                    $(Aggregate::$variant => $topic,)*
                }
            }

            /// The aggregate of this name, `None` for anything else.
            pub fn from_name(name: &str) -> Option<Aggregate> {
                match name {
                    $($name => Some(Aggregate::$variant),)*
                    _ => None,
                }
            }
        }

        /// Every aggregate type an outbox row can name (each has a topic, [`topic_for_aggregate`]).
        pub const AGGREGATES: [&str; Aggregate::ALL.len()] = [$($name),*];

        /// Every event topic, in the order of [`Aggregate::ALL`].
        pub const EVENT_TOPICS: [&str; Aggregate::ALL.len()] = [$($topic),*];
    };
}

/// The consumer group of order-service.
pub const ORDER_SERVICE: &str = "order-service";
/// The consumer group of inventory-service.
pub const INVENTORY_SERVICE: &str = "inventory-service";
/// The consumer group of payment-service.
pub const PAYMENT_SERVICE: &str = "payment-service";

/// Declares the events: each with its aggregate and the consumer groups that act on it. The
/// variant name is the struct's, the Avro record name and the `event-type` header; its schema is
/// `avro/<name>.avsc`.
macro_rules! events {
    ($($name:ident in $aggregate:ident, read by [$($reader:ident),*],)*) => {
        /// Any event of the saga. The variant name is the Avro record name and the `event-type`
        /// header.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Event {
            $($name($name),)*
        }

        /// The position of each event type in [`Event::EVENT_TYPES`].
        #[derive(Clone, Copy)]
        #[allow(clippy::enum_variant_names)]
        enum Index {
            $($name,)*
        }

        impl Event {
            /// Every event type (Avro record name), in declaration order.
            pub const EVENT_TYPES: [&'static str; [$(stringify!($name)),*].len()] =
                [$(stringify!($name)),*];

            /// Position of this variant in [`Event::EVENT_TYPES`].
            pub(crate) fn index(&self) -> usize {
                match self {
                    $(Event::$name(_) => Index::$name as usize,)*
                }
            }

            /// The Avro record name, e.g. `"OrderPlaced"` (the `event-type` header value).
            pub fn event_type(&self) -> &'static str {
                Self::EVENT_TYPES[self.index()]
            }

            /// The order the event belongs to (the record key and `correlation-id`).
            pub fn order_id(&self) -> Uuid {
                match self {
                    $(Event::$name(e) => e.order_id,)*
                }
            }

            /// The consumer groups that act on the event (DESIGN.md's flow). Every other group
            /// reading its topic passes it by: it has nothing to do for it.
            pub fn read_by(&self) -> &'static [&'static str] {
                match self {
                    $(Event::$name(_) => &[$($reader),*],)*
                }
            }

            /// [`Event::read_by`] for an `event-type` header's value; `None` for a type that is
            /// not one of the saga's.
            pub fn readers_of(event_type: &str) -> Option<&'static [&'static str]> {
                match event_type {
                    $(stringify!($name) => Some(&[$($reader),*]),)*
                    _ => None,
                }
            }

            /// The aggregate the event belongs to.
            pub fn aggregate(&self) -> Aggregate {
                match self {
                    $(Event::$name(_) => Aggregate::$aggregate,)*
                }
            }

            /// The aggregate's name, e.g. `"order"` (the outbox row's `aggregate_type`).
            pub fn aggregate_type(&self) -> &'static str {
                self.aggregate().name()
            }

            /// The topic the event goes to: its aggregate's.
            pub fn topic(&self) -> &'static str {
                self.aggregate().topic()
            }

            /// Checks the event against the contract's bounds ([`crate::limits`]).
            pub fn check_bounds(&self) -> Result<(), crate::limits::BoundsError> {
                use crate::limits::WithinContract as _;
                match self {
                    $(Event::$name(e) => e.check(),)*
                }
            }

            /// The event as an Avro value of its own schema's shape.
            pub(crate) fn to_avro_value(&self) -> Result<apache_avro::types::Value, apache_avro::Error> {
                match self {
                    $(Event::$name(e) => apache_avro::to_value(e),)*
                }
            }

            /// The event as JSON with the schema's field names.
            pub(crate) fn to_json(&self) -> serde_json::Result<Vec<u8>> {
                match self {
                    $(Event::$name(e) => serde_json::to_vec(e),)*
                }
            }

            /// The event of type `index` read from an Avro value.
            pub(crate) fn from_avro_value(
                index: usize,
                value: &apache_avro::types::Value,
            ) -> Result<Event, apache_avro::Error> {
                $(if index == Index::$name as usize {
                    return apache_avro::from_value::<$name>(value).map(Event::$name);
                })*
                unreachable!("event type index {index} out of range")
            }

            /// The event of type `index` read from JSON.
            pub(crate) fn from_json(index: usize, bytes: &[u8]) -> serde_json::Result<Event> {
                $(if index == Index::$name as usize {
                    return serde_json::from_slice::<$name>(bytes).map(Event::$name);
                })*
                unreachable!("event type index {index} out of range")
            }
        }

        /// Schema JSON text per event type, in the order of [`Event::EVENT_TYPES`].
        pub(crate) const SCHEMA_SOURCES: [&str; Event::EVENT_TYPES.len()] =
            [$(include_str!(concat!("../avro/", stringify!($name), ".avsc"))),*];

        $(
            impl From<$name> for Event {
                fn from(event: $name) -> Self {
                    Event::$name(event)
                }
            }
        )*
    };
}

aggregates! {
    /// Orders: `OrderPlaced`, `OrderAwaitingPayment`, `OrderConfirmed`, `OrderRejected`,
    /// `OrderRefundRequested`, `OrderCancelled`.
    Order = "order" on ORDERS_TOPIC = "orders.v1", ORDER_AGGREGATE;
    /// Stock: `StockReserved`, `StockReservationRejected`, `StockReleased`.
    Inventory = "inventory" on INVENTORY_TOPIC = "inventory.v1", INVENTORY_AGGREGATE;
    /// Payments: `PaymentConfirmed`, `PaymentDeclined`, `PaymentRefunded`.
    Payment = "payment" on PAYMENTS_TOPIC = "payments.v1", PAYMENT_AGGREGATE;
}

events! {
    OrderPlaced in Order, read by [INVENTORY_SERVICE],
    OrderAwaitingPayment in Order, read by [PAYMENT_SERVICE],
    OrderConfirmed in Order, read by [INVENTORY_SERVICE],
    // Inventory reserved nothing for a rejected order: there is nothing to undo.
    OrderRejected in Order, read by [],
    OrderRefundRequested in Order, read by [PAYMENT_SERVICE],
    OrderCancelled in Order, read by [INVENTORY_SERVICE],
    StockReserved in Inventory, read by [ORDER_SERVICE],
    StockReservationRejected in Inventory, read by [ORDER_SERVICE],
    StockReleased in Inventory, read by [ORDER_SERVICE],
    PaymentConfirmed in Payment, read by [ORDER_SERVICE],
    PaymentDeclined in Payment, read by [ORDER_SERVICE],
    PaymentRefunded in Payment, read by [ORDER_SERVICE],
}

/// The topic an aggregate type publishes to (`"order"` → `orders.v1`, `"inventory"` →
/// `inventory.v1`, `"payment"` → `payments.v1`), `None` for anything else.
pub fn topic_for_aggregate(aggregate_type: &str) -> Option<&'static str> {
    Aggregate::from_name(aggregate_type).map(Aggregate::topic)
}
