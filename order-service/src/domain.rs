//! The order state machine, pure: given an order and what happened, decide the new status and
//! the event to emit. No I/O here; the HTTP handlers, the consumer and the step timeouts apply
//! the decision ([`crate::transition`]).
//!
//! PENDING → AWAITING_PAYMENT → CONFIRMED; PENDING → REJECTED; PENDING → CANCELLING;
//! AWAITING_PAYMENT or CONFIRMED → REFUNDING → CANCELLING; AWAITING_PAYMENT → CANCELLING
//! (declined); CANCELLING → CANCELLED. Compensations run in reverse order of the steps they undo:
//! the refund first (REFUNDING), then the stock (CANCELLING), each only after the one before is
//! done. The README's table lists every status × input.

use std::fmt;
use std::str::FromStr;

use schemas::CancelReason;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderStatus {
    Pending,
    AwaitingPayment,
    Confirmed,
    Rejected,
    Refunding,
    Cancelling,
    Cancelled,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 7] = [
        OrderStatus::Pending,
        OrderStatus::AwaitingPayment,
        OrderStatus::Confirmed,
        OrderStatus::Rejected,
        OrderStatus::Refunding,
        OrderStatus::Cancelling,
        OrderStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::AwaitingPayment => "AWAITING_PAYMENT",
            OrderStatus::Confirmed => "CONFIRMED",
            OrderStatus::Rejected => "REJECTED",
            OrderStatus::Refunding => "REFUNDING",
            OrderStatus::Cancelling => "CANCELLING",
            OrderStatus::Cancelled => "CANCELLED",
        }
    }

    /// Whether the saga of an order in this status is over.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            OrderStatus::Rejected | OrderStatus::Cancelled | OrderStatus::Confirmed
        )
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "unknown order status {0:?}; expected one of PENDING, AWAITING_PAYMENT, CONFIRMED, REJECTED, REFUNDING, CANCELLING, CANCELLED"
)]
pub struct UnknownStatus(pub String);

impl FromStr for OrderStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OrderStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// An order as the state machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Order {
    pub status: OrderStatus,
    /// The reserved total, known from StockReserved on: the amount the payment is asked for.
    pub total_cents: Option<i64>,
    /// Why it is being cancelled, from the moment a cancellation was decided (kept through
    /// REFUNDING for the OrderCancelled that follows the refund).
    pub cancel_reason: Option<CancelReason>,
}

impl Order {
    /// An order whose payment was asked for (it went through AWAITING_PAYMENT).
    fn payment_asked(&self) -> bool {
        self.total_cents.is_some()
    }
}

/// What happened to an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Inventory reserved every line (StockReserved).
    StockReserved { total_cents: i64 },
    /// Inventory could not reserve (StockReservationRejected).
    StockRejected { reason: String },
    /// The processor charged the order's payment (PaymentConfirmed).
    PaymentConfirmed { amount_cents: i64 },
    /// The processor declined it (PaymentDeclined).
    PaymentDeclined { reason: String },
    /// The payment was refunded (`refunded_cents` > 0) or voided (0) (PaymentRefunded).
    PaymentRefunded { refunded_cents: i64 },
    /// The customer, or a step's timeout, asked to cancel.
    CancelRequested { reason: CancelReason },
    /// Inventory released the order's stock (`released_stock`: it had reserved or sold some), or
    /// confirmed it held none (StockReleased).
    StockReleased { released_stock: bool },
}

/// The event an order emits on a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emit {
    OrderAwaitingPayment {
        amount_cents: i64,
    },
    OrderConfirmed {
        total_cents: i64,
    },
    OrderRejected {
        reason: String,
    },
    OrderRefundRequested {
        amount_cents: i64,
        reason: CancelReason,
    },
    OrderCancelled {
        reason: CancelReason,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Move to `to`, emitting `emit` if any.
    Transition { to: OrderStatus, emit: Option<Emit> },
    /// Nothing to change; the reason says why that is correct.
    Ignore(&'static str),
}

/// An input the order cannot take: it is refused (a cancel answers 409, a record is
/// dead-lettered with this reason) and nothing is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTransition {
    #[error("an order in status {status} cannot take {input}")]
    Pair {
        status: OrderStatus,
        input: &'static str,
    },
    #[error("{input} of {cents} cents does not match the order's total of {total_cents} cents")]
    Amount {
        input: &'static str,
        cents: i64,
        total_cents: i64,
    },
}

impl Input {
    fn name(&self) -> &'static str {
        match self {
            Input::StockReserved { .. } => "StockReserved",
            Input::StockRejected { .. } => "StockReservationRejected",
            Input::PaymentConfirmed { .. } => "PaymentConfirmed",
            Input::PaymentDeclined { .. } => "PaymentDeclined",
            Input::PaymentRefunded { .. } => "PaymentRefunded",
            Input::CancelRequested { .. } => "a cancel request",
            Input::StockReleased { .. } => "StockReleased",
        }
    }
}

/// The order state machine: every (status, input) pair is decided here.
pub fn decide(order: &Order, input: &Input) -> Result<Decision, InvalidTransition> {
    use OrderStatus::*;
    let to = |to, emit| {
        Ok(Decision::Transition {
            to,
            emit: Some(emit),
        })
    };
    let ignore = |why| Ok(Decision::Ignore(why));
    let invalid = || {
        Err(InvalidTransition::Pair {
            status: order.status,
            input: input.name(),
        })
    };
    // The order's total, which every payment event must match (known once the stock is reserved).
    let total = order.total_cents.unwrap_or_default();
    let amount_differs = |cents: i64| {
        Err(InvalidTransition::Amount {
            input: input.name(),
            cents,
            total_cents: total,
        })
    };
    match (order.status, input) {
        (Pending, Input::StockReserved { total_cents }) => to(
            AwaitingPayment,
            Emit::OrderAwaitingPayment {
                amount_cents: *total_cents,
            },
        ),
        (Pending, Input::StockRejected { reason }) => to(
            Rejected,
            Emit::OrderRejected {
                reason: reason.clone(),
            },
        ),
        (Pending, Input::CancelRequested { reason }) => {
            to(Cancelling, Emit::OrderCancelled { reason: *reason })
        }
        (AwaitingPayment, Input::PaymentConfirmed { amount_cents }) if *amount_cents == total => {
            to(Confirmed, Emit::OrderConfirmed { total_cents: total })
        }
        (AwaitingPayment | Confirmed | Refunding, Input::PaymentConfirmed { amount_cents })
            if *amount_cents != total =>
        {
            amount_differs(*amount_cents)
        }
        (AwaitingPayment, Input::PaymentDeclined { .. }) => to(
            Cancelling,
            Emit::OrderCancelled {
                reason: CancelReason::PaymentDeclined,
            },
        ),
        // A charge may be in flight, or made: ask for the money back before the stock.
        (AwaitingPayment | Confirmed, Input::CancelRequested { reason }) => to(
            Refunding,
            Emit::OrderRefundRequested {
                amount_cents: total,
                reason: *reason,
            },
        ),
        (Refunding, Input::PaymentRefunded { refunded_cents })
            if *refunded_cents == 0 || *refunded_cents == total =>
        {
            to(
                Cancelling,
                Emit::OrderCancelled {
                    reason: order.cancel_reason.unwrap_or(CancelReason::CustomerRequest),
                },
            )
        }
        (Refunding, Input::PaymentRefunded { refunded_cents }) => amount_differs(*refunded_cents),
        (Cancelling, Input::StockReleased { .. }) => Ok(Decision::Transition {
            to: Cancelled,
            emit: None,
        }),
        (AwaitingPayment | Confirmed | Refunding, Input::StockReserved { .. }) => {
            ignore("already reserved: a repeated StockReserved")
        }
        (Confirmed, Input::PaymentConfirmed { .. }) => ignore("already confirmed by this payment"),
        (Refunding, Input::PaymentConfirmed { .. }) => ignore(
            "charged while the refund was being asked for: the refund request covers the charge",
        ),
        (Refunding, Input::PaymentDeclined { .. }) => ignore(
            "declined while the refund was being asked for: nothing was charged, and payment-service answers the refund request with 0",
        ),
        (Rejected, Input::StockRejected { .. }) => ignore("already rejected"),
        (Cancelling, Input::StockReserved { .. } | Input::StockRejected { .. }) => ignore(
            "being cancelled: inventory releases whatever it reserved, then answers StockReleased",
        ),
        (Refunding | Cancelling | Cancelled, Input::CancelRequested { .. }) => {
            ignore("already being cancelled")
        }
        (Cancelled, Input::StockReleased { .. }) => ignore("already cancelled"),
        (Cancelled, Input::StockRejected { .. }) => ignore(
            "already cancelled; inventory reserved nothing (its OrderPlaced came after the cancellation)",
        ),
        (
            Cancelling | Cancelled,
            Input::PaymentConfirmed { .. }
            | Input::PaymentDeclined { .. }
            | Input::PaymentRefunded { .. },
        ) if order.payment_asked() => {
            ignore("the payment step is over: its refund or decline already moved the order on")
        }
        _ => invalid(),
    }
}

#[cfg(test)]
mod tests {
    use super::OrderStatus::*;
    use super::*;

    const TOTAL: i64 = 700;

    fn inputs() -> Vec<Input> {
        vec![
            Input::StockReserved { total_cents: TOTAL },
            Input::StockRejected {
                reason: "no stock".into(),
            },
            Input::PaymentConfirmed {
                amount_cents: TOTAL,
            },
            Input::PaymentDeclined {
                reason: "declined".into(),
            },
            Input::PaymentRefunded {
                refunded_cents: TOTAL,
            },
            Input::CancelRequested {
                reason: CancelReason::CustomerRequest,
            },
            Input::StockReleased {
                released_stock: true,
            },
        ]
    }

    /// The order in `status` as the saga leaves it there: its total is known from the
    /// reservation on (and for CANCELLING and CANCELLED only when `paid_step`: it went through
    /// the payment step).
    fn order(status: OrderStatus, paid_step: bool) -> Order {
        let reserved = match status {
            Pending | Rejected => false,
            AwaitingPayment | Confirmed | Refunding => true,
            Cancelling | Cancelled => paid_step,
        };
        Order {
            status,
            total_cents: reserved.then_some(TOTAL),
            cancel_reason: matches!(status, Refunding | Cancelling | Cancelled)
                .then_some(CancelReason::PaymentTimeout),
        }
    }

    /// The whole table, written out by hand as the README's: for each status, the outcome of
    /// each input in the order of [`inputs`].
    fn expected(status: OrderStatus, paid_step: bool) -> [&'static str; 7] {
        let late_payment = if paid_step { "ignore" } else { "invalid" };
        match status {
            Pending => [
                "AWAITING_PAYMENT+OrderAwaitingPayment",
                "REJECTED+OrderRejected",
                "invalid",
                "invalid",
                "invalid",
                "CANCELLING+OrderCancelled",
                "invalid",
            ],
            AwaitingPayment => [
                "ignore",
                "invalid",
                "CONFIRMED+OrderConfirmed",
                "CANCELLING+OrderCancelled",
                "invalid",
                "REFUNDING+OrderRefundRequested",
                "invalid",
            ],
            Confirmed => [
                "ignore",
                "invalid",
                "ignore",
                "invalid",
                "invalid",
                "REFUNDING+OrderRefundRequested",
                "invalid",
            ],
            Rejected => [
                "invalid", "ignore", "invalid", "invalid", "invalid", "invalid", "invalid",
            ],
            Refunding => [
                "ignore",
                "invalid",
                "ignore",
                "ignore",
                "CANCELLING+OrderCancelled",
                "ignore",
                "invalid",
            ],
            Cancelling => [
                "ignore",
                "ignore",
                late_payment,
                late_payment,
                late_payment,
                "ignore",
                "CANCELLED",
            ],
            Cancelled => [
                "invalid",
                "ignore",
                late_payment,
                late_payment,
                late_payment,
                "ignore",
                "ignore",
            ],
        }
    }

    fn describe(result: Result<Decision, InvalidTransition>) -> String {
        match result {
            Ok(Decision::Transition { to, emit: None }) => to.to_string(),
            Ok(Decision::Transition { to, emit: Some(e) }) => {
                let name = match e {
                    Emit::OrderAwaitingPayment { .. } => "OrderAwaitingPayment",
                    Emit::OrderConfirmed { .. } => "OrderConfirmed",
                    Emit::OrderRejected { .. } => "OrderRejected",
                    Emit::OrderRefundRequested { .. } => "OrderRefundRequested",
                    Emit::OrderCancelled { .. } => "OrderCancelled",
                };
                format!("{to}+{name}")
            }
            Ok(Decision::Ignore(_)) => "ignore".into(),
            Err(_) => "invalid".into(),
        }
    }

    #[test]
    fn every_status_and_input_pair_is_decided_as_the_table_says() {
        for status in OrderStatus::ALL {
            for paid_step in [false, true] {
                let order = order(status, paid_step);
                for (input, want) in inputs().iter().zip(expected(status, paid_step)) {
                    assert_eq!(
                        describe(decide(&order, input)),
                        want,
                        "{order:?} + {input:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_payment_is_asked_for_the_reserved_total_and_must_match_it() {
        let pending = order(Pending, false);
        assert_eq!(
            decide(&pending, &Input::StockReserved { total_cents: 1234 }),
            Ok(Decision::Transition {
                to: AwaitingPayment,
                emit: Some(Emit::OrderAwaitingPayment { amount_cents: 1234 })
            })
        );
        for status in [AwaitingPayment, Confirmed, Refunding] {
            let err = decide(
                &order(status, true),
                &Input::PaymentConfirmed { amount_cents: 699 },
            )
            .unwrap_err();
            assert_eq!(
                err.to_string(),
                "PaymentConfirmed of 699 cents does not match the order's total of 700 cents"
            );
        }
        // A refund is of the whole total, or nothing (a payment never charged).
        let refunding = order(Refunding, true);
        for refunded_cents in [0, TOTAL] {
            assert!(matches!(
                decide(&refunding, &Input::PaymentRefunded { refunded_cents }),
                Ok(Decision::Transition { to: Cancelling, .. })
            ));
        }
        assert!(decide(&refunding, &Input::PaymentRefunded { refunded_cents: 1 }).is_err());
    }

    #[test]
    fn a_cancel_after_the_payment_was_asked_for_refunds_first_and_keeps_its_reason() {
        for status in [AwaitingPayment, Confirmed] {
            assert_eq!(
                decide(
                    &order(status, true),
                    &Input::CancelRequested {
                        reason: CancelReason::PaymentTimeout
                    }
                ),
                Ok(Decision::Transition {
                    to: Refunding,
                    emit: Some(Emit::OrderRefundRequested {
                        amount_cents: TOTAL,
                        reason: CancelReason::PaymentTimeout
                    })
                })
            );
        }
        // The refund done, the stock is released for the reason the cancellation had.
        assert_eq!(
            decide(
                &order(Refunding, true),
                &Input::PaymentRefunded {
                    refunded_cents: TOTAL
                }
            ),
            Ok(Decision::Transition {
                to: Cancelling,
                emit: Some(Emit::OrderCancelled {
                    reason: CancelReason::PaymentTimeout
                })
            })
        );
        assert_eq!(
            decide(
                &order(AwaitingPayment, true),
                &Input::PaymentDeclined {
                    reason: "over_limit".into()
                }
            ),
            Ok(Decision::Transition {
                to: Cancelling,
                emit: Some(Emit::OrderCancelled {
                    reason: CancelReason::PaymentDeclined
                })
            })
        );
    }

    #[test]
    fn rejection_carries_the_inventory_reason() {
        let reason = "unknown sku NOPE".to_owned();
        assert_eq!(
            decide(
                &order(Pending, false),
                &Input::StockRejected {
                    reason: reason.clone()
                }
            ),
            Ok(Decision::Transition {
                to: Rejected,
                emit: Some(Emit::OrderRejected { reason })
            })
        );
    }

    #[test]
    fn a_rejected_order_cannot_be_cancelled() {
        let err = decide(
            &order(Rejected, false),
            &Input::CancelRequested {
                reason: CancelReason::CustomerRequest,
            },
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "an order in status REJECTED cannot take a cancel request"
        );
    }

    #[test]
    fn statuses_parse_from_their_names_only() {
        for status in OrderStatus::ALL {
            assert_eq!(status.as_str().parse::<OrderStatus>().unwrap(), status);
        }
        assert!("pending".parse::<OrderStatus>().is_err());
    }
}
