//! The audit's rules, as pure functions over what was read: each returns the findings it makes.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

/// A record of an event topic, as the audit needs it.
#[derive(Debug, Clone)]
pub struct TopicRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// CreateTime, Unix milliseconds.
    pub timestamp_ms: Option<i64>,
    pub key: Option<String>,
    pub message_id: Option<Uuid>,
    pub event_type: Option<String>,
    /// The message that caused it (`causation-id`).
    pub causation_id: Option<Uuid>,
}

/// A dead letter: its message id and where the original record was.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub message_id: Option<Uuid>,
    pub original: Option<(String, i32, i64)>,
}

#[derive(Debug, Clone)]
pub struct OrderRow {
    pub order_id: Uuid,
    pub status: String,
    /// The reserved total, once the stock was reserved (its payment was asked for).
    pub total_cents: Option<i64>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct PaymentRow {
    pub payment_id: Uuid,
    pub order_id: Uuid,
    pub status: String,
    pub amount_cents: i64,
    pub refunded_cents: i64,
}

/// A charge in the processor's ledger, with what its refunds returned.
#[derive(Debug, Clone)]
pub struct LedgerCharge {
    pub charge_id: Uuid,
    pub payment_id: Uuid,
    pub amount_cents: i64,
    pub succeeded: bool,
    pub refunded_cents: i64,
    pub created_at: DateTime<Utc>,
}

impl LedgerCharge {
    /// What the processor kept of it.
    fn kept(&self) -> i64 {
        if self.succeeded {
            self.amount_cents - self.refunded_cents
        } else {
            0
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReservationRow {
    pub order_id: Uuid,
    pub status: String,
    /// (sku, quantity)
    pub lines: Vec<(String, i64)>,
}

#[derive(Debug, Clone)]
pub struct ProductRow {
    pub sku: String,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
    pub stock_added: i64,
}

/// What the audit found wrong. Serialized with a `kind` field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    /// A record older than the grace period that the group never applied and did not
    /// dead-letter.
    Unapplied {
        group: String,
        topic: String,
        partition: i32,
        offset: i64,
        message_id: Option<Uuid>,
        event_type: Option<String>,
        key: Option<String>,
        /// Its key waits behind a retry (parked) in the group's database.
        parked: bool,
    },
    /// An accepted order still not terminal after the grace period.
    NotTerminal {
        order_id: Uuid,
        status: String,
        since: DateTime<Utc>,
    },
    /// A terminal order whose reservation disagrees with its status.
    StatusMismatch {
        order_id: Uuid,
        order_status: String,
        reservation_status: Option<String>,
        expected: String,
    },
    /// A reservation that holds or sold stock for an order order-service does not know.
    OrphanReservation { order_id: Uuid, status: String },
    /// Stock of a sku not conserved, or not matching the reservations.
    Stock { sku: String, problem: String },
    /// An order's events out of order on its topic (or on more than one partition).
    OutOfOrder {
        topic: String,
        key: String,
        problem: String,
    },
    /// An order whose OrderPlaced inventory-service applied but which has no answer to it on
    /// inventory.v1 (StockReserved or StockReservationRejected caused by it), more than one, or
    /// a StockReleased before its StockReserved.
    Unanswered { order_id: String, problem: String },
    /// A terminal order whose payment disagrees with it: a confirmed order not paid its total
    /// once, a cancelled or rejected order whose money was kept, a charge for no order.
    Money { order_id: Uuid, problem: String },
    /// The processor's ledger disagrees with the orders: a payment charged more than once, a
    /// terminal order for which the processor kept other than its total (CONFIRMED) or nothing
    /// (CANCELLED, REJECTED), money kept for a payment payment-service does not know.
    Ledger {
        payment_id: Uuid,
        order_id: Option<Uuid>,
        problem: String,
    },
    /// An outbox row older than the threshold: the relay is not publishing it.
    OldOutbox {
        source: String,
        message_id: Uuid,
        age_seconds: u64,
    },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Unapplied {
                group,
                topic,
                partition,
                offset,
                message_id,
                event_type,
                key,
                parked,
            } => {
                let id = message_id.map_or("no valid message-id".to_owned(), |m| m.to_string());
                write!(
                    f,
                    "unapplied: {topic}[{partition}]@{offset} ({}, message {id}, key {}) was never \
                     applied by {group} and is not in its DLQ",
                    event_type.as_deref().unwrap_or("no event-type"),
                    key.as_deref().unwrap_or("none")
                )?;
                if *parked {
                    write!(f, "; its key waits behind a retry")?;
                }
                Ok(())
            }
            Finding::NotTerminal {
                order_id,
                status,
                since,
            } => write!(
                f,
                "not terminal: order {order_id} is {status} since {since}"
            ),
            Finding::StatusMismatch {
                order_id,
                order_status,
                reservation_status,
                expected,
            } => write!(
                f,
                "status mismatch: order {order_id} is {order_status} but its reservation is {}; \
                 expected {expected}",
                reservation_status.as_deref().unwrap_or("absent")
            ),
            Finding::OrphanReservation { order_id, status } => write!(
                f,
                "orphan reservation: {status} reservation for order {order_id}, which \
                 order-service does not know"
            ),
            Finding::Stock { sku, problem } => write!(f, "stock of {sku}: {problem}"),
            Finding::OutOfOrder {
                topic,
                key,
                problem,
            } => write!(f, "out of order on {topic}, key {key}: {problem}"),
            Finding::Unanswered { order_id, problem } => {
                write!(f, "unanswered: order {order_id}: {problem}")
            }
            Finding::Money { order_id, problem } => {
                write!(f, "money: order {order_id}: {problem}")
            }
            Finding::Ledger {
                payment_id,
                order_id: Some(order_id),
                problem,
            } => write!(
                f,
                "ledger: order {order_id}, payment {payment_id}: {problem}"
            ),
            Finding::Ledger {
                payment_id,
                order_id: None,
                problem,
            } => write!(f, "ledger: payment {payment_id}: {problem}"),
            Finding::OldOutbox {
                source,
                message_id,
                age_seconds,
            } => write!(
                f,
                "old outbox row: {source} message {message_id} has waited {age_seconds} s"
            ),
        }
    }
}

/// Records of `group`'s topic, older than `cutoff_ms`, that have no inbox row (`applied`) and
/// no dead letter (by message id, or by original place for records without a valid id). Events
/// the group does not act on ([`schemas::Event::read_by`]) are passed by with no inbox row and
/// are not looked for; a record whose type is not one of the saga's must be dead-lettered.
pub fn unapplied(
    group: &str,
    records: &[TopicRecord],
    applied: &HashSet<Uuid>,
    dead: &[DeadLetter],
    parked_keys: &HashSet<String>,
    cutoff_ms: i64,
) -> Vec<Finding> {
    let dead_ids: HashSet<Uuid> = dead.iter().filter_map(|d| d.message_id).collect();
    let dead_places: HashSet<(&str, i32, i64)> = dead
        .iter()
        .filter_map(|d| d.original.as_ref())
        .map(|(t, p, o)| (t.as_str(), *p, *o))
        .collect();
    records
        .iter()
        .filter(|r| r.timestamp_ms.is_none_or(|t| t < cutoff_ms))
        .filter(|r| {
            r.event_type
                .as_deref()
                .and_then(schemas::Event::readers_of)
                .is_none_or(|readers| readers.contains(&group))
        })
        .filter(|r| match r.message_id {
            Some(id) => !applied.contains(&id) && !dead_ids.contains(&id),
            None => !dead_places.contains(&(r.topic.as_str(), r.partition, r.offset)),
        })
        .map(|r| Finding::Unapplied {
            group: group.to_owned(),
            topic: r.topic.clone(),
            partition: r.partition,
            offset: r.offset,
            message_id: r.message_id,
            event_type: r.event_type.clone(),
            key: r.key.clone(),
            parked: r.key.as_ref().is_some_and(|k| parked_keys.contains(k)),
        })
        .collect()
}

/// Orders not terminal after the grace period, terminal orders whose reservation disagrees,
/// and reservations of unknown orders.
pub fn orders(
    orders: &[OrderRow],
    reservations: &[ReservationRow],
    cutoff: DateTime<Utc>,
) -> Vec<Finding> {
    let by_order: HashMap<Uuid, &ReservationRow> =
        reservations.iter().map(|r| (r.order_id, r)).collect();
    let mut findings = Vec::new();
    for order in orders.iter().filter(|o| o.updated_at < cutoff) {
        let reservation = by_order.get(&order.order_id).map(|r| r.status.as_str());
        let (ok, expected) = match order.status.as_str() {
            "PENDING" | "AWAITING_PAYMENT" | "REFUNDING" | "CANCELLING" => {
                findings.push(Finding::NotTerminal {
                    order_id: order.order_id,
                    status: order.status.clone(),
                    since: order.updated_at,
                });
                continue;
            }
            "CONFIRMED" => (reservation == Some("COMMITTED"), "COMMITTED"),
            "CANCELLED" => (
                matches!(reservation, None | Some("RELEASED")),
                "RELEASED or absent",
            ),
            "REJECTED" => (reservation.is_none(), "absent"),
            other => (false, other),
        };
        if !ok {
            findings.push(Finding::StatusMismatch {
                order_id: order.order_id,
                order_status: order.status.clone(),
                reservation_status: reservation.map(str::to_owned),
                expected: expected.to_owned(),
            });
        }
    }
    let known: HashSet<Uuid> = orders.iter().map(|o| o.order_id).collect();
    findings.extend(
        reservations
            .iter()
            .filter(|r| r.status != "RELEASED" && !known.contains(&r.order_id))
            .map(|r| Finding::OrphanReservation {
                order_id: r.order_id,
                status: r.status.clone(),
            }),
    );
    findings
}

/// Money, per terminal order older than `cutoff` and its payment (payment-service's; at most one
/// per order): a CONFIRMED order was charged its total (payment CONFIRMED for that amount); a
/// CANCELLED order that asked for a payment kept nothing (its payment REFUNDED in full, VOIDED
/// or DECLINED); an order that never asked for one (REJECTED, or cancelled while PENDING) has no
/// payment that took money; and no charged payment belongs to no order.
pub fn payments(
    orders: &[OrderRow],
    payments: &[PaymentRow],
    cutoff: DateTime<Utc>,
) -> Vec<Finding> {
    let by_order: HashMap<Uuid, &PaymentRow> = payments.iter().map(|p| (p.order_id, p)).collect();
    let kept_money = |p: &PaymentRow| match p.status.as_str() {
        "CONFIRMED" => p.amount_cents,
        "REFUNDED" => p.amount_cents - p.refunded_cents,
        _ => 0,
    };
    let mut findings = Vec::new();
    for order in orders.iter().filter(|o| o.updated_at < cutoff) {
        let payment = by_order.get(&order.order_id).copied();
        let problem = match (order.status.as_str(), payment, order.total_cents) {
            ("CONFIRMED", Some(p), Some(total))
                if p.status == "CONFIRMED" && p.amount_cents == total =>
            {
                None
            }
            ("CONFIRMED", p, total) => Some(format!(
                "CONFIRMED for {total:?} cents, but its payment is {}",
                p.map_or("absent".to_owned(), |p| format!("{} of {} cents", p.status, p.amount_cents))
            )),
            ("CANCELLED" | "REJECTED", Some(p), _) if kept_money(p) != 0 => Some(format!(
                "{} but its payment {} kept {} cents ({}, refunded {})",
                order.status,
                p.payment_id,
                kept_money(p),
                p.status,
                p.refunded_cents
            )),
            ("CANCELLED", None, Some(_)) => Some(
                "CANCELLED after its payment was asked for, but payment-service has no payment of it".to_owned(),
            ),
            _ => None,
        };
        if let Some(problem) = problem {
            findings.push(Finding::Money {
                order_id: order.order_id,
                problem,
            });
        }
    }
    let known: HashSet<Uuid> = orders.iter().map(|o| o.order_id).collect();
    findings.extend(
        payments
            .iter()
            .filter(|p| kept_money(p) != 0 && !known.contains(&p.order_id))
            .map(|p| Finding::Money {
                order_id: p.order_id,
                problem: format!(
                    "payment {} kept {} cents for an order order-service does not know",
                    p.payment_id,
                    kept_money(p)
                ),
            }),
    );
    findings
}

/// The money promise against the processor's ledger: no payment charged twice; for every
/// terminal order not updated since `cutoff`, what the processor kept of its payment's charges
/// (charged − refunded) is its total when CONFIRMED and nothing when CANCELLED or REJECTED;
/// no money kept for a payment payment-service does not know (charges older than `cutoff`).
pub fn ledger(
    orders: &[OrderRow],
    payments: &[PaymentRow],
    charges: &[LedgerCharge],
    cutoff: DateTime<Utc>,
) -> Vec<Finding> {
    let mut by_payment: HashMap<Uuid, Vec<&LedgerCharge>> = HashMap::new();
    for charge in charges {
        by_payment
            .entry(charge.payment_id)
            .or_default()
            .push(charge);
    }
    let order_of: HashMap<Uuid, Uuid> = payments
        .iter()
        .map(|p| (p.payment_id, p.order_id))
        .collect();
    let mut findings = Vec::new();
    let finding = |payment_id: Uuid, problem: String| Finding::Ledger {
        payment_id,
        order_id: order_of.get(&payment_id).copied(),
        problem,
    };
    let mut twice: Vec<(&Uuid, &Vec<&LedgerCharge>)> = by_payment
        .iter()
        .filter(|(_, c)| c.iter().filter(|c| c.succeeded).count() > 1)
        .collect();
    twice.sort_by_key(|(id, _)| **id);
    for (payment_id, charges) in twice {
        let ids: Vec<String> = charges
            .iter()
            .filter(|c| c.succeeded)
            .map(|c| format!("{} ({} cents)", c.charge_id, c.amount_cents))
            .collect();
        findings.push(finding(
            *payment_id,
            format!(
                "charged more than once by the processor: {}",
                ids.join(", ")
            ),
        ));
    }
    let payment_of: HashMap<Uuid, Uuid> = payments
        .iter()
        .map(|p| (p.order_id, p.payment_id))
        .collect();
    let kept = |payment_id: &Uuid| -> i64 {
        by_payment
            .get(payment_id)
            .map_or(0, |c| c.iter().map(|c| c.kept()).sum())
    };
    for order in orders.iter().filter(|o| o.updated_at < cutoff) {
        let Some(payment_id) = payment_of.get(&order.order_id) else {
            continue;
        };
        let expected = match (order.status.as_str(), order.total_cents) {
            ("CONFIRMED", Some(total)) => total,
            ("CANCELLED" | "REJECTED", _) => 0,
            _ => continue,
        };
        let kept = kept(payment_id);
        if kept != expected {
            findings.push(finding(
                *payment_id,
                format!(
                    "the order is {} for {:?} cents, but the processor kept {kept} cents of its charges (expected {expected})",
                    order.status, order.total_cents
                ),
            ));
        }
    }
    let mut unknown: Vec<(&Uuid, i64)> = by_payment
        .iter()
        .filter(|(id, c)| !order_of.contains_key(id) && c.iter().all(|c| c.created_at < cutoff))
        .map(|(id, _)| (id, kept(id)))
        .filter(|(_, kept)| *kept != 0)
        .collect();
    unknown.sort();
    for (payment_id, kept) in unknown {
        findings.push(finding(
            *payment_id,
            format!("the processor kept {kept} cents for a payment payment-service does not know"),
        ));
    }
    findings
}

/// Per sku: none negative, stock added = available + reserved + sold, reserved = the lines of
/// RESERVED reservations, sold = the lines of COMMITTED ones. `products` and `reservations` must
/// come from one snapshot.
pub fn stock(products: &[ProductRow], reservations: &[ReservationRow]) -> Vec<Finding> {
    let mut held: HashMap<&str, (i128, i128)> = HashMap::new();
    for r in reservations {
        for (sku, quantity) in &r.lines {
            let entry = held.entry(sku.as_str()).or_default();
            match r.status.as_str() {
                "RESERVED" => entry.0 += i128::from(*quantity),
                "COMMITTED" => entry.1 += i128::from(*quantity),
                _ => {}
            }
        }
    }
    let mut findings = Vec::new();
    for p in products {
        let mut problems = Vec::new();
        if p.available < 0 || p.reserved < 0 || p.sold < 0 {
            problems.push(format!(
                "negative: available {}, reserved {}, sold {}",
                p.available, p.reserved, p.sold
            ));
        }
        let sum = i128::from(p.available) + i128::from(p.reserved) + i128::from(p.sold);
        if sum != i128::from(p.stock_added) {
            problems.push(format!(
                "stock added {} but available + reserved + sold = {sum}",
                p.stock_added
            ));
        }
        let (reserved, sold) = held.remove(p.sku.as_str()).unwrap_or_default();
        if reserved != i128::from(p.reserved) {
            problems.push(format!(
                "reserved {} but RESERVED reservations hold {reserved}",
                p.reserved
            ));
        }
        if sold != i128::from(p.sold) {
            problems.push(format!(
                "sold {} but COMMITTED reservations hold {sold}",
                p.sold
            ));
        }
        findings.extend(problems.into_iter().map(|problem| Finding::Stock {
            sku: p.sku.clone(),
            problem,
        }));
    }
    for (sku, (reserved, sold)) in held {
        if reserved != 0 || sold != 0 {
            findings.push(Finding::Stock {
                sku: sku.to_owned(),
                problem: format!(
                    "reservations hold {reserved} reserved and {sold} sold of a product that \
                     does not exist"
                ),
            });
        }
    }
    findings
}

/// Each order's events on `records` (one topic) in offset order, each message once: on one
/// partition, and in an order its producer's state machine allows.
pub fn event_order(records: &[TopicRecord]) -> Vec<Finding> {
    let mut by_key: HashMap<&str, Vec<&TopicRecord>> = HashMap::new();
    for r in records {
        if let Some(key) = &r.key {
            by_key.entry(key.as_str()).or_default().push(r);
        }
    }
    let mut findings = Vec::new();
    for (key, mut events) in by_key {
        let topic = events[0].topic.clone();
        let partitions: HashSet<i32> = events.iter().map(|r| r.partition).collect();
        if partitions.len() > 1 {
            let mut partitions: Vec<i32> = partitions.into_iter().collect();
            partitions.sort_unstable();
            findings.push(Finding::OutOfOrder {
                topic,
                key: key.to_owned(),
                problem: format!("events on partitions {partitions:?}"),
            });
            continue;
        }
        events.sort_by_key(|r| r.offset);
        let mut seen = HashSet::new();
        let types: Vec<&str> = events
            .iter()
            .filter(|r| r.message_id.is_none_or(|id| seen.insert(id)))
            .filter_map(|r| r.event_type.as_deref())
            .collect();
        if let Some(problem) = sequence_problem(&types) {
            findings.push(Finding::OutOfOrder {
                topic,
                key: key.to_owned(),
                problem,
            });
        }
    }
    findings
}

/// Every order whose OrderPlaced (on `placed`, older than `cutoff_ms`) inventory-service applied
/// (`applied`) has exactly one answer among its events on `answers` (inventory.v1): a
/// StockReserved or StockReservationRejected whose `causation-id` is that OrderPlaced, and no
/// StockReleased before a StockReserved (inventory releases only what it reserved, after). A
/// cancellation inventory saw first is answered StockReleased, then the late OrderPlaced
/// StockReservationRejected: that order is fine. An OrderPlaced that was dead-lettered (`dead`)
/// is left out (redriven, it may have been applied after its order was cancelled).
pub fn inventory_answers(
    placed: &[TopicRecord],
    applied: &HashSet<Uuid>,
    dead: &[DeadLetter],
    answers: &[TopicRecord],
    cutoff_ms: i64,
) -> Vec<Finding> {
    let dead_ids: HashSet<Uuid> = dead.iter().filter_map(|d| d.message_id).collect();
    let mut placed_by_order: HashMap<&str, HashSet<Uuid>> = HashMap::new();
    for r in placed {
        let (Some(id), Some(key)) = (r.message_id, &r.key) else {
            continue;
        };
        if r.event_type.as_deref() == Some("OrderPlaced")
            && r.timestamp_ms.is_none_or(|t| t < cutoff_ms)
            && applied.contains(&id)
            && !dead_ids.contains(&id)
        {
            placed_by_order.entry(key.as_str()).or_default().insert(id);
        }
    }
    let mut events: HashMap<&str, Vec<&TopicRecord>> = HashMap::new();
    for r in answers {
        if let Some(key) = r.key.as_deref().filter(|k| placed_by_order.contains_key(k)) {
            events.entry(key).or_default().push(r);
        }
    }
    let mut findings = Vec::new();
    for (key, placed_ids) in placed_by_order {
        let mut order_events = events.remove(key).unwrap_or_default();
        order_events.sort_by_key(|r| (r.partition, r.offset));
        let mut seen = HashSet::new();
        order_events.retain(|r| r.message_id.is_none_or(|id| seen.insert(id)));
        let is_answer = |r: &&TopicRecord| {
            matches!(
                r.event_type.as_deref(),
                Some("StockReserved" | "StockReservationRejected")
            ) && r.causation_id.is_some_and(|c| placed_ids.contains(&c))
        };
        let answered: Vec<usize> = (0..order_events.len())
            .filter(|&i| is_answer(&order_events[i]))
            .collect();
        let released_first = |i: usize| {
            order_events[..i]
                .iter()
                .any(|r| r.event_type.as_deref() == Some("StockReleased"))
        };
        let problem = match answered[..] {
            [] => "inventory-service applied its OrderPlaced, but no StockReserved or \
                   StockReservationRejected caused by it is on inventory.v1: the answer was lost"
                .to_owned(),
            [i] if order_events[i].event_type.as_deref() == Some("StockReserved")
                && released_first(i) =>
            {
                "a StockReleased comes before its StockReserved".to_owned()
            }
            [_] => continue,
            ref more => format!("its OrderPlaced was answered {} times", more.len()),
        };
        findings.push(Finding::Unanswered {
            order_id: key.to_owned(),
            problem,
        });
    }
    findings.sort_by_key(|f| f.to_string());
    findings
}

/// What is wrong with one order's sequence of event types (one topic, each message once), by
/// the order and reservation state machines of the README: `None` when they can produce it.
pub fn sequence_problem(types: &[&str]) -> Option<String> {
    let (mut placed, mut decided, mut cancelled) = (false, None::<&str>, false);
    let (mut stock_decided, mut released) = (None::<&str>, false);
    for (i, &t) in types.iter().enumerate() {
        let problem = match t {
            "OrderPlaced" if i > 0 => Some(format!("OrderPlaced after {}", types[..i].join(", "))),
            "OrderPlaced" => {
                placed = true;
                None
            }
            "OrderConfirmed" | "OrderRejected" | "OrderCancelled" if !placed => {
                Some(format!("{t} before OrderPlaced"))
            }
            "OrderConfirmed" | "OrderRejected" => match (decided, cancelled) {
                (Some(earlier), _) => Some(format!("{t} after {earlier}")),
                (None, true) => Some(format!("{t} after OrderCancelled")),
                (None, false) => {
                    decided = Some(t);
                    None
                }
            },
            "OrderCancelled" if cancelled => Some("OrderCancelled twice".to_owned()),
            "OrderCancelled" => {
                cancelled = true;
                None
            }
            "StockReserved" | "StockReservationRejected" => match (stock_decided, released) {
                (Some(earlier), _) => Some(format!("{t} after {earlier}")),
                (None, true) if t == "StockReserved" => {
                    Some("StockReserved after StockReleased".to_owned())
                }
                _ => {
                    stock_decided = Some(t);
                    None
                }
            },
            "StockReleased" if released => Some("StockReleased twice".to_owned()),
            "StockReleased" => {
                released = true;
                None
            }
            _ => None,
        };
        if problem.is_some() {
            return problem;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVENTORY: &str = schemas::INVENTORY_SERVICE;

    fn record(partition: i32, offset: i64, key: &str, id: u128, event: &str) -> TopicRecord {
        TopicRecord {
            topic: "orders.v1".into(),
            partition,
            offset,
            timestamp_ms: Some(0),
            key: Some(key.into()),
            message_id: Some(Uuid::from_u128(id)),
            event_type: Some(event.into()),
            causation_id: None,
        }
    }

    #[test]
    fn a_record_neither_applied_nor_dead_lettered_is_found() {
        let records = [
            record(0, 0, "k", 1, "OrderPlaced"),
            record(0, 1, "k", 2, "OrderConfirmed"),
            record(0, 2, "j", 3, "OrderPlaced"),
        ];
        let applied = HashSet::from([Uuid::from_u128(1)]);
        let dead = [DeadLetter {
            message_id: Some(Uuid::from_u128(3)),
            original: None,
        }];
        let parked = HashSet::from(["k".to_owned()]);
        let found = unapplied(INVENTORY, &records, &applied, &dead, &parked, 1);
        assert_eq!(found.len(), 1);
        assert!(matches!(
            &found[0],
            Finding::Unapplied {
                offset: 1,
                parked: true,
                ..
            }
        ));
    }

    #[test]
    fn recent_records_and_dead_lettered_records_without_an_id_are_not_findings() {
        let mut recent = record(0, 0, "k", 1, "OrderPlaced");
        recent.timestamp_ms = Some(10);
        let mut poison = record(0, 1, "k", 2, "OrderPlaced");
        poison.message_id = None;
        let dead = [DeadLetter {
            message_id: None,
            original: Some(("orders.v1".into(), 0, 1)),
        }];
        let none = HashSet::new();
        let records = [recent, poison.clone()];
        assert!(unapplied(INVENTORY, &records, &HashSet::new(), &dead, &none, 5).is_empty());
        assert_eq!(
            unapplied(INVENTORY, &[poison], &HashSet::new(), &[], &none, 5).len(),
            1
        );
    }

    #[test]
    fn events_the_group_does_not_act_on_need_no_inbox_row_but_unknown_types_do() {
        let records = [
            record(0, 0, "k", 1, "OrderAwaitingPayment"),
            record(0, 1, "k", 2, "OrderRejected"),
            record(0, 2, "k", 3, "NoSuchEvent"),
        ];
        let (none, parked) = (HashSet::new(), HashSet::new());
        let found = unapplied(INVENTORY, &records, &none, &[], &parked, 1);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(matches!(&found[0], Finding::Unapplied { offset: 2, .. }));
        // payment-service acts on OrderAwaitingPayment: without an inbox row it is a finding.
        let found = unapplied(
            schemas::PAYMENT_SERVICE,
            &records[..1],
            &none,
            &[],
            &parked,
            1,
        );
        assert_eq!(found.len(), 1, "{found:?}");
    }

    fn order(id: u128, status: &str) -> OrderRow {
        OrderRow {
            order_id: Uuid::from_u128(id),
            status: status.into(),
            total_cents: None,
            updated_at: DateTime::UNIX_EPOCH,
        }
    }

    fn paid_order(id: u128, status: &str, total_cents: i64) -> OrderRow {
        OrderRow {
            total_cents: Some(total_cents),
            ..order(id, status)
        }
    }

    fn payment(id: u128, status: &str, amount_cents: i64, refunded_cents: i64) -> PaymentRow {
        PaymentRow {
            payment_id: Uuid::from_u128(1000 + id),
            order_id: Uuid::from_u128(id),
            status: status.into(),
            amount_cents,
            refunded_cents,
        }
    }

    #[test]
    fn a_confirmed_order_is_paid_its_total_and_a_cancelled_one_keeps_no_money() {
        let orders_ = [
            paid_order(1, "CONFIRMED", 500),
            paid_order(2, "CONFIRMED", 500),
            paid_order(3, "CONFIRMED", 500),
            paid_order(4, "CANCELLED", 500),
            paid_order(5, "CANCELLED", 500),
            paid_order(6, "CANCELLED", 500),
            paid_order(7, "CANCELLED", 500),
            paid_order(8, "CANCELLED", 500),
            order(9, "CANCELLED"),
            order(10, "REJECTED"),
            paid_order(11, "CANCELLED", 500),
        ];
        let payments_ = [
            payment(1, "CONFIRMED", 500, 0),
            payment(2, "CONFIRMED", 499, 0),
            // 3: no payment at all.
            payment(4, "REFUNDED", 500, 500),
            payment(5, "VOIDED", 500, 0),
            payment(6, "DECLINED", 500, 0),
            payment(7, "CONFIRMED", 500, 0),
            payment(8, "REFUNDED", 500, 100),
            payment(10, "CONFIRMED", 300, 0),
            // 11: asked for, and no payment.
            payment(12, "CONFIRMED", 700, 0),
            payment(13, "VOIDED", 700, 0),
        ];
        let found: Vec<u128> = payments(&orders_, &payments_, Utc::now())
            .iter()
            .map(|f| match f {
                Finding::Money { order_id, .. } => order_id.as_u128(),
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(found, [2, 3, 7, 8, 10, 11, 12]);
        assert_eq!(
            payments(&orders_, &payments_, DateTime::UNIX_EPOCH).len(),
            1,
            "within the grace period only the charge for no order counts"
        );
    }

    fn charge(payment: u128, n: u128, amount_cents: i64, refunded_cents: i64) -> LedgerCharge {
        LedgerCharge {
            charge_id: Uuid::from_u128(5000 + payment * 10 + n),
            payment_id: Uuid::from_u128(1000 + payment),
            amount_cents,
            succeeded: true,
            refunded_cents,
            created_at: DateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn the_processor_keeps_the_confirmed_totals_and_charges_each_payment_once() {
        let orders_ = [
            paid_order(1, "CONFIRMED", 500),
            paid_order(2, "CONFIRMED", 500),
            paid_order(3, "CANCELLED", 500),
            paid_order(4, "CANCELLED", 500),
            paid_order(5, "CANCELLED", 500),
            paid_order(6, "CONFIRMED", 500),
            paid_order(7, "AWAITING_PAYMENT", 500),
            paid_order(8, "CANCELLED", 500),
        ];
        let payments_: Vec<PaymentRow> = (1..=8).map(|n| payment(n, "CONFIRMED", 500, 0)).collect();
        let declined = LedgerCharge {
            succeeded: false,
            ..charge(8, 1, 500, 0)
        };
        let charges = [
            charge(1, 1, 500, 0),
            // 2: never charged.
            charge(3, 1, 500, 500),
            // 4: a late charge nobody refunded.
            charge(4, 1, 500, 0),
            // 5: refunded in part.
            charge(5, 1, 500, 200),
            // 6: charged twice, one refunded: the total kept, but charged twice.
            charge(6, 1, 500, 0),
            charge(6, 2, 500, 500),
            // 7: in flight, not terminal: not checked.
            charge(7, 1, 500, 0),
            declined,
            // A payment payment-service does not know.
            charge(9, 1, 300, 0),
            charge(10, 1, 300, 300),
        ];
        let found: Vec<(u128, Option<u128>)> = ledger(&orders_, &payments_, &charges, Utc::now())
            .iter()
            .map(|f| match f {
                Finding::Ledger {
                    payment_id,
                    order_id,
                    ..
                } => (payment_id.as_u128() - 1000, order_id.map(|o| o.as_u128())),
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(
            found,
            [
                (6, Some(6)),
                (2, Some(2)),
                (4, Some(4)),
                (5, Some(5)),
                (9, None)
            ]
        );
        let recent: Vec<String> = ledger(&orders_, &payments_, &charges, DateTime::UNIX_EPOCH)
            .iter()
            .map(|f| f.to_string())
            .collect();
        assert_eq!(
            recent.len(),
            1,
            "within the grace period only the double charge: {recent:?}"
        );
        assert!(recent[0].contains("charged more than once"), "{recent:?}");
    }

    fn reservation(id: u128, status: &str, lines: &[(&str, i64)]) -> ReservationRow {
        ReservationRow {
            order_id: Uuid::from_u128(id),
            status: status.into(),
            lines: lines.iter().map(|(s, q)| (s.to_string(), *q)).collect(),
        }
    }

    #[test]
    fn order_statuses_must_agree_with_reservations() {
        let orders_ = [
            order(1, "CONFIRMED"),
            order(2, "CONFIRMED"),
            order(3, "CANCELLED"),
            order(4, "CANCELLED"),
            order(5, "REJECTED"),
            order(6, "PENDING"),
            order(7, "CANCELLED"),
            order(8, "REJECTED"),
        ];
        let reservations = [
            reservation(1, "COMMITTED", &[]),
            reservation(2, "RESERVED", &[]),
            reservation(3, "RELEASED", &[]),
            reservation(7, "RESERVED", &[]),
            reservation(8, "COMMITTED", &[]),
            reservation(9, "RESERVED", &[]),
        ];
        let found = orders(&orders_, &reservations, Utc::now());
        let ids: Vec<(u128, &str)> = found
            .iter()
            .map(|f| match f {
                Finding::StatusMismatch { order_id, .. } => (order_id.as_u128(), "mismatch"),
                Finding::NotTerminal { order_id, .. } => (order_id.as_u128(), "not terminal"),
                Finding::OrphanReservation { order_id, .. } => (order_id.as_u128(), "orphan"),
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(
            ids,
            [
                (2, "mismatch"),
                (6, "not terminal"),
                (7, "mismatch"),
                (8, "mismatch"),
                (9, "orphan")
            ]
        );
        assert_eq!(
            orders(&orders_, &reservations, DateTime::UNIX_EPOCH).len(),
            1,
            "within the grace period only the orphan counts"
        );
    }

    #[test]
    fn stock_must_match_the_reservations() {
        let product = |sku: &str, available, reserved, sold| ProductRow {
            sku: sku.into(),
            available,
            reserved,
            sold,
            stock_added: available + reserved + sold,
        };
        let reservations = [
            reservation(1, "RESERVED", &[("A", 2), ("B", 1)]),
            reservation(2, "COMMITTED", &[("A", 3)]),
            reservation(3, "RELEASED", &[("A", 50)]),
        ];
        let good = [product("A", 5, 2, 3), product("B", 0, 1, 0)];
        assert!(stock(&good, &reservations).is_empty());
        let moved = [product("A", 5, 3, 2), product("B", 0, 1, 0)];
        assert_eq!(stock(&moved, &reservations).len(), 2);
        let mut broken = product("B", 0, 1, 0);
        broken.stock_added = 5;
        assert_eq!(stock(&[good[0].clone(), broken], &reservations).len(), 1);
        assert_eq!(
            stock(&good[..1], &reservations).len(),
            1,
            "B's reservation without B"
        );
    }

    #[test]
    fn sequences_the_state_machines_produce_are_accepted() {
        for ok in [
            &["OrderPlaced"][..],
            &["OrderPlaced", "OrderConfirmed"],
            &["OrderPlaced", "OrderRejected"],
            &["OrderPlaced", "OrderCancelled"],
            &["OrderPlaced", "OrderConfirmed", "OrderCancelled"],
            &["StockReserved", "StockReleased"],
            &["StockReleased", "StockReservationRejected"],
            &["StockReservationRejected", "StockReleased"],
        ] {
            assert_eq!(sequence_problem(ok), None, "{ok:?}");
        }
    }

    #[test]
    fn sequences_out_of_order_are_named() {
        for (bad, why) in [
            (
                &["OrderConfirmed", "OrderPlaced"][..],
                "OrderConfirmed before OrderPlaced",
            ),
            (
                &["OrderPlaced", "OrderCancelled", "OrderConfirmed"],
                "OrderConfirmed after OrderCancelled",
            ),
            (
                &["OrderPlaced", "OrderConfirmed", "OrderRejected"],
                "OrderRejected after OrderConfirmed",
            ),
            (
                &["OrderPlaced", "OrderPlaced"],
                "OrderPlaced after OrderPlaced",
            ),
            (
                &["StockReleased", "StockReserved"],
                "StockReserved after StockReleased",
            ),
            (
                &["StockReserved", "StockReserved"],
                "StockReserved after StockReserved",
            ),
        ] {
            assert_eq!(sequence_problem(bad).as_deref(), Some(why), "{bad:?}");
        }
    }

    #[test]
    fn event_order_ignores_redeliveries_and_catches_split_keys() {
        let records = [
            record(0, 0, "k", 1, "OrderPlaced"),
            record(0, 1, "k", 2, "OrderConfirmed"),
            record(0, 2, "k", 1, "OrderPlaced"),
        ];
        assert!(
            event_order(&records).is_empty(),
            "a republished OrderPlaced is a duplicate, not a reorder"
        );
        let records = [
            record(0, 0, "k", 1, "OrderPlaced"),
            record(1, 0, "k", 2, "OrderConfirmed"),
        ];
        assert_eq!(event_order(&records).len(), 1);
        let records = [
            record(0, 5, "k", 1, "OrderPlaced"),
            record(0, 3, "k", 2, "OrderConfirmed"),
        ];
        assert_eq!(
            event_order(&records).len(),
            1,
            "offsets, not arrival, give the order"
        );
    }

    #[test]
    fn an_applied_order_placed_must_be_answered_once_and_a_reservation_not_released_first() {
        let placed = [
            record(0, 0, "answered", 1, "OrderPlaced"),
            record(0, 1, "lost", 2, "OrderPlaced"),
            record(0, 2, "released first", 3, "OrderPlaced"),
            record(0, 3, "not applied", 4, "OrderPlaced"),
            record(0, 4, "dead-lettered", 5, "OrderPlaced"),
            record(0, 5, "answered", 6, "OrderCancelled"),
            record(0, 6, "cancelled first", 7, "OrderPlaced"),
            record(0, 7, "answered twice", 8, "OrderPlaced"),
        ];
        let applied: HashSet<Uuid> = [1, 2, 3, 5, 6, 7, 8].map(Uuid::from_u128).into();
        let dead = [DeadLetter {
            message_id: Some(Uuid::from_u128(5)),
            original: None,
        }];
        let answer = |offset, key: &str, id, event: &str, cause: Option<u128>| {
            let mut r = record(1, offset, key, id, event);
            r.topic = "inventory.v1".into();
            r.causation_id = cause.map(Uuid::from_u128);
            r
        };
        let answers = [
            answer(3, "answered", 11, "StockReserved", Some(1)),
            answer(7, "answered", 12, "StockReleased", Some(6)),
            // The lost order has a release, but no answer to its OrderPlaced.
            answer(4, "lost", 13, "StockReleased", Some(99)),
            answer(5, "released first", 14, "StockReleased", Some(99)),
            answer(6, "released first", 15, "StockReserved", Some(3)),
            answer(8, "dead-lettered", 16, "StockReleased", Some(98)),
            answer(9, "cancelled first", 17, "StockReleased", Some(97)),
            answer(
                10,
                "cancelled first",
                18,
                "StockReservationRejected",
                Some(7),
            ),
            answer(11, "answered twice", 19, "StockReserved", Some(8)),
            answer(12, "answered twice", 20, "StockReserved", Some(8)),
            // A copy of the same message (the relay published it twice) is one answer.
            answer(13, "answered", 11, "StockReserved", Some(1)),
        ];
        let found = inventory_answers(&placed, &applied, &dead, &answers, 1);
        let orders: Vec<&str> = found
            .iter()
            .map(|f| match f {
                Finding::Unanswered { order_id, .. } => order_id.as_str(),
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(orders, ["answered twice", "lost", "released first"]);
        assert!(
            inventory_answers(&placed, &applied, &dead, &answers, 0).is_empty(),
            "within the grace period nothing is required"
        );
    }
}
