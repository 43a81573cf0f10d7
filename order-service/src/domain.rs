//! The order state machine, pure: given an order's status and what happened, decide the new status
//! and the event to emit. No I/O here; the HTTP handlers and the consumer apply the decision.
//!
//! PENDING → CONFIRMED | REJECTED; PENDING or CONFIRMED → CANCELLING → CANCELLED.

use std::fmt;
use std::str::FromStr;

use schemas::CancelReason;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Rejected,
    Cancelling,
    Cancelled,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 5] = [
        OrderStatus::Pending,
        OrderStatus::Confirmed,
        OrderStatus::Rejected,
        OrderStatus::Cancelling,
        OrderStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::Confirmed => "CONFIRMED",
            OrderStatus::Rejected => "REJECTED",
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
    "unknown order status {0:?}; expected one of PENDING, CONFIRMED, REJECTED, CANCELLING, CANCELLED"
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

/// What happened to an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Inventory reserved every line (StockReserved).
    StockReserved { total_cents: i64 },
    /// Inventory could not reserve (StockReservationRejected).
    StockRejected { reason: String },
    /// The customer or the saga deadline asked to cancel.
    CancelRequested { reason: CancelReason },
    /// Inventory released the order's stock (`released_stock`: it had reserved or sold some), or
    /// confirmed it held none (StockReleased).
    StockReleased { released_stock: bool },
}

/// The event an order emits on a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emit {
    OrderConfirmed { total_cents: i64 },
    OrderRejected { reason: String },
    OrderCancelled { reason: CancelReason },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Move to `to`, emitting `emit` if any.
    Transition { to: OrderStatus, emit: Option<Emit> },
    /// Nothing to change; the reason says why that is correct.
    Ignore(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an order in status {status} cannot take {input}")]
pub struct InvalidTransition {
    pub status: OrderStatus,
    pub input: &'static str,
}

impl Input {
    fn name(&self) -> &'static str {
        match self {
            Input::StockReserved { .. } => "StockReserved",
            Input::StockRejected { .. } => "StockReservationRejected",
            Input::CancelRequested { .. } => "a cancel request",
            Input::StockReleased { .. } => "StockReleased",
        }
    }
}

/// The order state machine: every (status, input) pair is decided here.
pub fn decide(status: OrderStatus, input: &Input) -> Result<Decision, InvalidTransition> {
    use OrderStatus::*;
    let to = |to, emit| Ok(Decision::Transition { to, emit });
    match (status, input) {
        (Pending, Input::StockReserved { total_cents }) => to(
            Confirmed,
            Some(Emit::OrderConfirmed {
                total_cents: *total_cents,
            }),
        ),
        (Pending, Input::StockRejected { reason }) => to(
            Rejected,
            Some(Emit::OrderRejected {
                reason: reason.clone(),
            }),
        ),
        (Pending | Confirmed, Input::CancelRequested { reason }) => {
            to(Cancelling, Some(Emit::OrderCancelled { reason: *reason }))
        }
        (Cancelling, Input::StockReleased { .. }) => to(Cancelled, None),
        (Confirmed, Input::StockReserved { .. }) => Ok(Decision::Ignore(
            "already confirmed by an earlier reservation",
        )),
        (Rejected, Input::StockRejected { .. }) => Ok(Decision::Ignore("already rejected")),
        (Cancelling, Input::StockReserved { .. } | Input::StockRejected { .. }) => {
            Ok(Decision::Ignore(
                "being cancelled: inventory releases whatever it reserved, then answers StockReleased",
            ))
        }
        (Cancelling | Cancelled, Input::CancelRequested { .. }) => {
            Ok(Decision::Ignore("already being cancelled"))
        }
        (Cancelled, Input::StockReleased { .. }) => Ok(Decision::Ignore("already cancelled")),
        (Cancelled, Input::StockRejected { .. }) => Ok(Decision::Ignore(
            "already cancelled; inventory reserved nothing (its OrderPlaced came after the cancellation)",
        )),
        (status, input) => Err(InvalidTransition {
            status,
            input: input.name(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::OrderStatus::*;
    use super::*;

    fn inputs() -> Vec<Input> {
        vec![
            Input::StockReserved { total_cents: 700 },
            Input::StockRejected {
                reason: "no stock".into(),
            },
            Input::CancelRequested {
                reason: CancelReason::CustomerRequest,
            },
            Input::StockReleased {
                released_stock: true,
            },
        ]
    }

    /// The whole table: (status, input index) → expected outcome, written out by hand.
    fn expected(status: OrderStatus, input: usize) -> &'static str {
        match (status, input) {
            (Pending, 0) => "CONFIRMED+OrderConfirmed",
            (Pending, 1) => "REJECTED+OrderRejected",
            (Pending, 2) | (Confirmed, 2) => "CANCELLING+OrderCancelled",
            (Cancelling, 3) => "CANCELLED",
            (Confirmed, 0) | (Rejected, 1) | (Cancelling, 0) | (Cancelling, 1) => "ignore",
            (Cancelling, 2) | (Cancelled, 1) | (Cancelled, 2) | (Cancelled, 3) => "ignore",
            _ => "invalid",
        }
    }

    fn describe(result: Result<Decision, InvalidTransition>) -> String {
        match result {
            Ok(Decision::Transition { to, emit: None }) => to.to_string(),
            Ok(Decision::Transition { to, emit: Some(e) }) => {
                let name = match e {
                    Emit::OrderConfirmed { .. } => "OrderConfirmed",
                    Emit::OrderRejected { .. } => "OrderRejected",
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
            for (i, input) in inputs().iter().enumerate() {
                assert_eq!(
                    describe(decide(status, input)),
                    expected(status, i),
                    "{status} + {input:?}"
                );
            }
        }
    }

    #[test]
    fn confirmation_carries_the_reserved_total() {
        assert_eq!(
            decide(Pending, &Input::StockReserved { total_cents: 1234 }),
            Ok(Decision::Transition {
                to: Confirmed,
                emit: Some(Emit::OrderConfirmed { total_cents: 1234 })
            })
        );
    }

    #[test]
    fn rejection_carries_the_inventory_reason() {
        let reason = "unknown sku NOPE".to_owned();
        assert_eq!(
            decide(
                Pending,
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
            Rejected,
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
