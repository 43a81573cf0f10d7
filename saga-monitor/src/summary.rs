//! A saga's summary from its steps: the order's status as its events tell it, the outcome, the
//! step it waits for and since when, and the counts of compensations, retries and dead letters.
//! Pure, so that the live projection and a rebuild compute the same row from the same steps.

use std::time::Duration;

use serde::Serialize;

use crate::step::{Kind, Step};

/// How a saga ended, or that it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    InProgress,
    Confirmed,
    Rejected,
    Cancelled,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::InProgress,
        Outcome::Confirmed,
        Outcome::Rejected,
        Outcome::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::InProgress => "in_progress",
            Outcome::Confirmed => "confirmed",
            Outcome::Rejected => "rejected",
            Outcome::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == text)
    }
}

/// The step a saga in progress waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Waiting {
    /// PENDING: inventory-service's answer to OrderPlaced.
    Reservation,
    /// AWAITING_PAYMENT: payment-service's answer to OrderAwaitingPayment.
    Payment,
    /// REFUNDING: payment-service's PaymentRefunded.
    Refund,
    /// CANCELLING: inventory-service's StockReleased.
    Release,
}

impl Waiting {
    pub const ALL: [Waiting; 4] = [
        Waiting::Reservation,
        Waiting::Payment,
        Waiting::Refund,
        Waiting::Release,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Waiting::Reservation => "reservation",
            Waiting::Payment => "payment",
            Waiting::Refund => "refund",
            Waiting::Release => "release",
        }
    }

    pub fn parse(text: &str) -> Option<Waiting> {
        Waiting::ALL.into_iter().find(|w| w.as_str() == text)
    }
}

/// How long a saga may wait for each step before it shows as stuck on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowances {
    pub reservation: Duration,
    pub payment: Duration,
    pub refund: Duration,
    pub release: Duration,
}

impl Allowances {
    pub fn of(&self, step: Waiting) -> Duration {
        match step {
            Waiting::Reservation => self.reservation,
            Waiting::Payment => self.payment,
            Waiting::Refund => self.refund,
            Waiting::Release => self.release,
        }
    }
}

/// The event types that undo an earlier step, or ask for it to be undone.
pub const COMPENSATIONS: [&str; 4] = [
    "OrderRefundRequested",
    "PaymentRefunded",
    "OrderCancelled",
    "StockReleased",
];

/// Whether `step` is part of a compensation (shown as such on the saga's page).
pub fn is_compensation(step: &Step) -> bool {
    step.kind == Kind::Event
        && step
            .event_type
            .as_deref()
            .is_some_and(|t| COMPENSATIONS.contains(&t))
}

/// A saga's summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The order's status; `None` when no order event of it was seen (records for an order the
    /// system never accepted, say, produced by hand).
    pub status: Option<&'static str>,
    pub outcome: Outcome,
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub waiting: Option<(Waiting, i64)>,
    /// Compensating actions done: refunds (and voids) and stock releases.
    pub compensations: i32,
    pub retries: i32,
    pub dead_letters: i32,
    pub steps: i32,
    /// The trace of the saga: its first step's.
    pub trace_id: Option<String>,
}

/// The summary of a saga whose steps are `steps`, in causal order ([`crate::timeline::order`]).
/// The status follows the order's own events in their commit order (their offsets on
/// `orders.v1`, one partition per order); the end of a cancellation, which order-service
/// announces with no event, is the StockReleased that answers OrderCancelled.
pub fn summarize(steps: &[Step]) -> Summary {
    let mut order_events: Vec<&Step> = steps
        .iter()
        .filter(|s| s.kind == Kind::Event && s.decoded && s.topic == schemas::ORDERS_TOPIC)
        .collect();
    order_events.sort_by_key(|s| (s.partition, s.offset));
    let mut status = None;
    let mut since = None;
    for s in &order_events {
        let next = match s.event_type.as_deref() {
            Some("OrderPlaced") => "PENDING",
            Some("OrderAwaitingPayment") => "AWAITING_PAYMENT",
            Some("OrderConfirmed") => "CONFIRMED",
            Some("OrderRejected") => "REJECTED",
            Some("OrderRefundRequested") => "REFUNDING",
            Some("OrderCancelled") => "CANCELLING",
            _ => continue,
        };
        status = Some(next);
        since = Some(s.at_ms);
    }
    let released = steps.iter().find(|s| {
        s.kind == Kind::Event && s.decoded && s.event_type.as_deref() == Some("StockReleased")
    });
    if let (Some("CANCELLING"), Some(released)) = (status, released) {
        status = Some("CANCELLED");
        since = Some(released.at_ms.max(since.unwrap_or(i64::MIN)));
    }
    let outcome = match status {
        Some("CONFIRMED") => Outcome::Confirmed,
        Some("REJECTED") => Outcome::Rejected,
        Some("CANCELLED") => Outcome::Cancelled,
        _ => Outcome::InProgress,
    };
    let waiting = match status {
        Some("PENDING") => Some(Waiting::Reservation),
        Some("AWAITING_PAYMENT") => Some(Waiting::Payment),
        Some("REFUNDING") => Some(Waiting::Refund),
        Some("CANCELLING") => Some(Waiting::Release),
        _ => None,
    }
    .zip(since);
    let count = |kind: Kind| steps.iter().filter(|s| s.kind == kind).count() as i32;
    let placed = order_events
        .iter()
        .find(|s| s.event_type.as_deref() == Some("OrderPlaced"));
    Summary {
        status,
        outcome,
        started_at_ms: placed
            .map(|s| s.at_ms)
            .or_else(|| steps.iter().map(|s| s.at_ms).min())
            .unwrap_or(0),
        ended_at_ms: (outcome != Outcome::InProgress).then(|| since.unwrap_or(0)),
        waiting,
        compensations: steps
            .iter()
            .filter(|s| {
                s.kind == Kind::Event
                    && matches!(
                        s.event_type.as_deref(),
                        Some("PaymentRefunded" | "StockReleased")
                    )
            })
            .count() as i32,
        retries: count(Kind::Retry),
        dead_letters: count(Kind::DeadLetter),
        steps: steps.len() as i32,
        trace_id: steps.iter().find_map(|s| s.trace_id.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::tests::step;

    fn saga(types: &[(&str, &str)]) -> Vec<Step> {
        types
            .iter()
            .enumerate()
            .map(|(i, (topic, event_type))| {
                let mut s = step(i as u128 + 1, 1_000 * (i as i64 + 1), None, Kind::Event);
                s.topic = (*topic).to_owned();
                s.event_type = Some((*event_type).to_owned());
                s
            })
            .collect()
    }

    const O: &str = "orders.v1";
    const I: &str = "inventory.v1";
    const P: &str = "payments.v1";

    #[test]
    fn each_outcome_follows_from_the_order_events() {
        let confirmed = summarize(&saga(&[
            (O, "OrderPlaced"),
            (I, "StockReserved"),
            (O, "OrderAwaitingPayment"),
            (P, "PaymentConfirmed"),
            (O, "OrderConfirmed"),
        ]));
        assert_eq!(confirmed.status, Some("CONFIRMED"));
        assert_eq!(confirmed.outcome, Outcome::Confirmed);
        assert_eq!(
            (confirmed.started_at_ms, confirmed.ended_at_ms),
            (1_000, Some(5_000))
        );
        assert_eq!((confirmed.waiting, confirmed.compensations), (None, 0));

        let rejected = summarize(&saga(&[
            (O, "OrderPlaced"),
            (I, "StockReservationRejected"),
            (O, "OrderRejected"),
        ]));
        assert_eq!(
            (rejected.outcome, rejected.ended_at_ms),
            (Outcome::Rejected, Some(3_000))
        );

        let refunded = saga(&[
            (O, "OrderPlaced"),
            (I, "StockReserved"),
            (O, "OrderAwaitingPayment"),
            (P, "PaymentConfirmed"),
            (O, "OrderConfirmed"),
            (O, "OrderRefundRequested"),
            (P, "PaymentRefunded"),
            (O, "OrderCancelled"),
            (I, "StockReleased"),
        ]);
        let cancelled = summarize(&refunded);
        assert_eq!(cancelled.status, Some("CANCELLED"));
        assert_eq!(
            (
                cancelled.outcome,
                cancelled.ended_at_ms,
                cancelled.compensations
            ),
            (Outcome::Cancelled, Some(9_000), 2)
        );

        // Each step of the way.
        let expect = [
            (1, Some("PENDING"), Some((Waiting::Reservation, 1_000))),
            (3, Some("AWAITING_PAYMENT"), Some((Waiting::Payment, 3_000))),
            (6, Some("REFUNDING"), Some((Waiting::Refund, 6_000))),
            (8, Some("CANCELLING"), Some((Waiting::Release, 8_000))),
        ];
        for (n, status, waiting) in expect {
            let s = summarize(&refunded[..n]);
            assert_eq!((s.status, s.waiting), (status, waiting), "after {n} steps");
            assert_eq!((s.outcome, s.ended_at_ms), (Outcome::InProgress, None));
        }
    }

    #[test]
    fn the_status_follows_commit_order_on_orders_v1_not_the_clocks() {
        let mut steps = saga(&[(O, "OrderPlaced"), (O, "OrderRejected")]);
        // Rejected committed after Placed, though stamped earlier.
        steps[1].at_ms = 500;
        assert_eq!(summarize(&steps).outcome, Outcome::Rejected);
        steps[1].offset = 0;
        steps[0].offset = 1;
        assert_eq!(summarize(&steps).status, Some("PENDING"));
    }

    #[test]
    fn retries_dead_letters_and_undecodable_steps_are_counted_but_move_no_status() {
        let mut steps = saga(&[(O, "OrderPlaced"), (O, "OrderConfirmed")]);
        steps[1].decoded = false;
        steps.push(step(10, 9_000, Some(1), Kind::Retry));
        steps.push(step(10, 9_500, Some(1), Kind::DeadLetter));
        let s = summarize(&steps);
        assert_eq!(s.status, Some("PENDING"));
        assert_eq!((s.retries, s.dead_letters, s.steps), (1, 1, 4));

        let orphan = summarize(&[step(3, 7_000, None, Kind::DeadLetter)]);
        assert_eq!((orphan.status, orphan.outcome), (None, Outcome::InProgress));
        assert_eq!((orphan.started_at_ms, orphan.waiting), (7_000, None));
    }
}
