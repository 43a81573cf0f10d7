//! What payment-service decides, as pure functions over a payment's state: what an order event
//! does to the order's payment ([`on_awaiting_payment`], [`on_refund_requested`]) and what the
//! payment's jobs do next ([`next_step`]). The consumer, the jobs and their tests share these, so
//! the rules are in one place and tested without a database.
//!
//! The rules that keep money right:
//! - **One payment per order**, made by the first OrderAwaitingPayment; a repeat changes nothing.
//! - **No charge after a refund was asked for**: once an order asks for its money back, no
//!   charge request is sent for it again, whatever job or message comes later.
//! - **An unknown outcome is found out, not guessed**: a charge whose request was sent but whose
//!   answer never came is settled by asking the processor's ledger, once no request of ours can
//!   still be in flight; what it charged is refunded, and a payment it never charged is voided.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use uuid::Uuid;

/// A payment's status (DESIGN.md: REQUESTED → CONFIRMED | DECLINED | VOIDED; CONFIRMED →
/// REFUNDED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PaymentStatus {
    /// Asked for; the charge has not been answered yet.
    Requested,
    /// Charged.
    Confirmed,
    /// The processor declined the charge: nothing was charged.
    Declined,
    /// Charged and refunded in full.
    Refunded,
    /// Never charged, and never will be: the order asked for its money back first.
    Voided,
}

impl PaymentStatus {
    pub const ALL: [PaymentStatus; 5] = [
        PaymentStatus::Requested,
        PaymentStatus::Confirmed,
        PaymentStatus::Declined,
        PaymentStatus::Refunded,
        PaymentStatus::Voided,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Requested => "REQUESTED",
            PaymentStatus::Confirmed => "CONFIRMED",
            PaymentStatus::Declined => "DECLINED",
            PaymentStatus::Refunded => "REFUNDED",
            PaymentStatus::Voided => "VOIDED",
        }
    }
}

impl fmt::Display for PaymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status text that is not one of [`PaymentStatus::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown payment status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for PaymentStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PaymentStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// A payment as the decisions see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub status: PaymentStatus,
    pub amount_cents: i64,
    /// The processor's charge, once it answered that it charged.
    pub charge_id: Option<Uuid>,
    /// Whether a charge request was ever sent (so the processor may have charged).
    pub charge_sent: bool,
    /// How long a charge request sent may still be in flight; `None` when none can be.
    pub in_flight_for: Option<Duration>,
    /// Whether the order asked for its money back.
    pub refund_requested: bool,
}

/// What an OrderAwaitingPayment does to the order's payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnAwaitingPayment {
    /// None yet: make it (REQUESTED) and queue its charge.
    Create,
    /// The order has one already (a repeat, or the refund came first and voided it): nothing.
    Ignore(&'static str),
    /// The order's payment was asked for with another amount: the record contradicts what was
    /// recorded, and is dead-lettered.
    AmountDiffers { recorded: i64, asked: i64 },
}

pub fn on_awaiting_payment(existing: Option<&Payment>, amount_cents: i64) -> OnAwaitingPayment {
    match existing {
        None => OnAwaitingPayment::Create,
        Some(p) if p.status == PaymentStatus::Voided => {
            OnAwaitingPayment::Ignore("the payment was voided before it was asked for")
        }
        Some(p) if p.amount_cents != amount_cents => OnAwaitingPayment::AmountDiffers {
            recorded: p.amount_cents,
            asked: amount_cents,
        },
        Some(_) => OnAwaitingPayment::Ignore("the order's payment was already asked for"),
    }
}

/// What an OrderRefundRequested does to the order's payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnRefundRequested {
    /// No payment was ever asked for: record one VOIDED (so that a late OrderAwaitingPayment
    /// charges nothing) and answer PaymentRefunded with 0 at once.
    VoidUnasked,
    /// Declined: nothing was charged; answer PaymentRefunded with 0 at once.
    AnswerNothingCharged,
    /// Mark the refund as asked for (no charge is sent from now on) and queue the refund job,
    /// which refunds what was charged or voids the payment.
    Settle,
    /// Already asked for, or already settled: nothing.
    Ignore(&'static str),
    /// The refund asks for another amount than the payment's: dead-lettered.
    AmountDiffers { recorded: i64, asked: i64 },
}

pub fn on_refund_requested(existing: Option<&Payment>, amount_cents: i64) -> OnRefundRequested {
    let Some(p) = existing else {
        return OnRefundRequested::VoidUnasked;
    };
    if p.refund_requested {
        return OnRefundRequested::Ignore("the order's refund was already asked for");
    }
    if p.amount_cents != amount_cents {
        return OnRefundRequested::AmountDiffers {
            recorded: p.amount_cents,
            asked: amount_cents,
        };
    }
    match p.status {
        PaymentStatus::Requested | PaymentStatus::Confirmed => OnRefundRequested::Settle,
        PaymentStatus::Declined => OnRefundRequested::AnswerNothingCharged,
        PaymentStatus::Refunded | PaymentStatus::Voided => {
            OnRefundRequested::Ignore("the payment is settled already")
        }
    }
}

/// What a payment's jobs do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send the charge (again, with the same key, when an earlier request got no answer).
    Charge,
    /// A charge request may still be in flight: look again after this long.
    Wait(Duration),
    /// A charge request was sent and its answer never came: ask the processor's ledger.
    AskLedger,
    /// Refund the charge in full.
    Refund { charge_id: Uuid, amount_cents: i64 },
    /// Nothing was charged and nothing will be: VOIDED, PaymentRefunded with 0.
    Void,
    /// Declined after the refund was asked for: PaymentRefunded with 0, the status stays.
    AnswerNothingCharged,
    /// Nothing left to do.
    Done,
}

pub fn next_step(p: &Payment) -> Step {
    match (p.status, p.refund_requested) {
        (PaymentStatus::Requested, false) => Step::Charge,
        (PaymentStatus::Requested, true) => match p.in_flight_for {
            Some(left) => Step::Wait(left),
            None if p.charge_sent => Step::AskLedger,
            None => Step::Void,
        },
        (PaymentStatus::Confirmed, true) => match p.charge_id {
            Some(charge_id) => Step::Refund {
                charge_id,
                amount_cents: p.amount_cents,
            },
            // A confirmed payment always has its charge; without it, find it in the ledger.
            None => Step::AskLedger,
        },
        (PaymentStatus::Declined, true) => Step::AnswerNothingCharged,
        (
            PaymentStatus::Confirmed
            | PaymentStatus::Declined
            | PaymentStatus::Refunded
            | PaymentStatus::Voided,
            _,
        ) => Step::Done,
    }
}

/// What the processor's ledger says of a payment whose charge got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerFinding {
    /// It charged: `charge_id` for the payment's amount.
    Charged { charge_id: Uuid },
    /// It declined the charge, or never got it: nothing was charged.
    NothingCharged,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payment(status: PaymentStatus) -> Payment {
        Payment {
            status,
            amount_cents: 500,
            charge_id: None,
            charge_sent: false,
            in_flight_for: None,
            refund_requested: false,
        }
    }

    #[test]
    fn statuses_read_back_as_written() {
        for status in PaymentStatus::ALL {
            assert_eq!(status.as_str().parse::<PaymentStatus>(), Ok(status));
        }
        assert!("PAID".parse::<PaymentStatus>().is_err());
    }

    #[test]
    fn the_first_request_makes_the_payment_and_every_later_one_is_a_repeat() {
        assert_eq!(on_awaiting_payment(None, 500), OnAwaitingPayment::Create);
        for status in PaymentStatus::ALL {
            let decision = on_awaiting_payment(Some(&payment(status)), 500);
            assert!(
                matches!(decision, OnAwaitingPayment::Ignore(_)),
                "{status}: {decision:?}"
            );
        }
        assert_eq!(
            on_awaiting_payment(Some(&payment(PaymentStatus::Requested)), 700),
            OnAwaitingPayment::AmountDiffers {
                recorded: 500,
                asked: 700
            }
        );
        // A voided payment's amount came from the refund request: a late request is ignored
        // whatever it asks, and charges nothing.
        assert!(matches!(
            on_awaiting_payment(Some(&payment(PaymentStatus::Voided)), 700),
            OnAwaitingPayment::Ignore(_)
        ));
    }

    #[test]
    fn a_refund_request_settles_each_status_once() {
        use OnRefundRequested as R;
        assert_eq!(on_refund_requested(None, 500), R::VoidUnasked);
        let expected = [
            (PaymentStatus::Requested, R::Settle),
            (PaymentStatus::Confirmed, R::Settle),
            (PaymentStatus::Declined, R::AnswerNothingCharged),
        ];
        for (status, want) in expected {
            assert_eq!(
                on_refund_requested(Some(&payment(status)), 500),
                want,
                "{status}"
            );
        }
        for status in [PaymentStatus::Refunded, PaymentStatus::Voided] {
            assert!(matches!(
                on_refund_requested(Some(&payment(status)), 500),
                R::Ignore(_)
            ));
        }
        for status in PaymentStatus::ALL {
            let asked = Payment {
                refund_requested: true,
                ..payment(status)
            };
            assert!(
                matches!(on_refund_requested(Some(&asked), 500), R::Ignore(_)),
                "a second request for {status} changes nothing"
            );
        }
        assert_eq!(
            on_refund_requested(Some(&payment(PaymentStatus::Confirmed)), 499),
            R::AmountDiffers {
                recorded: 500,
                asked: 499
            }
        );
    }

    #[test]
    fn no_charge_is_sent_once_a_refund_was_asked_for() {
        let charge_id = Uuid::from_u128(7);
        let requested = payment(PaymentStatus::Requested);
        let asked = |p: Payment| Payment {
            refund_requested: true,
            ..p
        };
        let cases = [
            (requested.clone(), Step::Charge),
            // Asked for before any request was sent: void.
            (asked(requested.clone()), Step::Void),
            // Sent, and maybe still in flight: wait it out, then ask the ledger.
            (
                asked(Payment {
                    charge_sent: true,
                    in_flight_for: Some(Duration::from_secs(3)),
                    ..requested.clone()
                }),
                Step::Wait(Duration::from_secs(3)),
            ),
            (
                asked(Payment {
                    charge_sent: true,
                    ..requested.clone()
                }),
                Step::AskLedger,
            ),
            (
                asked(Payment {
                    charge_id: Some(charge_id),
                    ..payment(PaymentStatus::Confirmed)
                }),
                Step::Refund {
                    charge_id,
                    amount_cents: 500,
                },
            ),
            (
                asked(payment(PaymentStatus::Declined)),
                Step::AnswerNothingCharged,
            ),
            (payment(PaymentStatus::Confirmed), Step::Done),
            (payment(PaymentStatus::Declined), Step::Done),
            (asked(payment(PaymentStatus::Refunded)), Step::Done),
            (asked(payment(PaymentStatus::Voided)), Step::Done),
            (payment(PaymentStatus::Voided), Step::Done),
        ];
        for (p, want) in cases {
            assert_eq!(next_step(&p), want, "{p:?}");
        }
        // Whatever the state, a payment whose refund was asked for never gets a charge.
        for status in PaymentStatus::ALL {
            for charge_sent in [false, true] {
                for in_flight_for in [None, Some(Duration::from_secs(1))] {
                    let p = asked(Payment {
                        charge_sent,
                        in_flight_for,
                        ..payment(status)
                    });
                    assert_ne!(next_step(&p), Step::Charge, "{p:?}");
                }
            }
        }
    }
}
