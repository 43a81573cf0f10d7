//! Inventory rules, pure: whether an order's lines can all be reserved from the current stock (all
//! or none), and the reservation state machine. No I/O here.
//!
//! Reservation statuses: RESERVED → COMMITTED; RESERVED or COMMITTED → RELEASED.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationStatus {
    Reserved,
    Committed,
    Released,
}

impl ReservationStatus {
    pub const ALL: [ReservationStatus; 3] = [
        ReservationStatus::Reserved,
        ReservationStatus::Committed,
        ReservationStatus::Released,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReservationStatus::Reserved => "RESERVED",
            ReservationStatus::Committed => "COMMITTED",
            ReservationStatus::Released => "RELEASED",
        }
    }
}

impl fmt::Display for ReservationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReservationStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReservationStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("unknown reservation status {s:?}"))
    }
}

/// What can happen to a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationInput {
    /// The order was confirmed: the reserved stock is sold.
    Commit,
    /// The order was cancelled: the stock goes back to available.
    Release,
}

/// The stock movement a reservation transition makes, per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StockMove {
    /// reserved → sold
    Sell,
    /// reserved → available
    Unreserve,
    /// sold → available (the compensation of a completed sale)
    Return,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationDecision {
    Transition {
        to: ReservationStatus,
        stock: StockMove,
    },
    Ignore(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a reservation in status {status} cannot take {input:?}")]
pub struct InvalidTransition {
    pub status: ReservationStatus,
    pub input: ReservationInput,
}

/// The reservation state machine: every (status, input) pair is decided here.
pub fn decide(
    status: ReservationStatus,
    input: ReservationInput,
) -> Result<ReservationDecision, InvalidTransition> {
    use ReservationInput::*;
    use ReservationStatus::*;
    match (status, input) {
        (Reserved, Commit) => Ok(ReservationDecision::Transition {
            to: Committed,
            stock: StockMove::Sell,
        }),
        (Reserved, Release) => Ok(ReservationDecision::Transition {
            to: Released,
            stock: StockMove::Unreserve,
        }),
        (Committed, Release) => Ok(ReservationDecision::Transition {
            to: Released,
            stock: StockMove::Return,
        }),
        (Committed, Commit) => Ok(ReservationDecision::Ignore("already committed")),
        (Released, Release) => Ok(ReservationDecision::Ignore("already released")),
        (Released, Commit) => Err(InvalidTransition { status, input }),
    }
}

/// Where an order stands with inventory when one of its events arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderState {
    /// No reservation; `cancelled`: its OrderCancelled has been seen (`cancelled_orders`).
    Unreserved { cancelled: bool },
    /// Its reservation, in this status.
    Reserved(ReservationStatus),
}

/// The events of `orders.v1` that inventory reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderEvent {
    Placed,
    Confirmed,
    Cancelled,
    Rejected,
}

impl OrderEvent {
    pub const ALL: [OrderEvent; 4] = [
        OrderEvent::Placed,
        OrderEvent::Confirmed,
        OrderEvent::Cancelled,
        OrderEvent::Rejected,
    ];
}

/// What inventory does with an order's event: the README's reservation table, row by row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    /// Reserve every line or none ([`reserve`] decides against the stock) and answer
    /// StockReserved or StockReservationRejected.
    Reserve,
    /// Answer StockReservationRejected without reserving anything: the order was cancelled
    /// before its OrderPlaced arrived.
    RejectCancelled,
    /// Not applicable yet: retried through the retry topics, then dead-lettered.
    NotYet,
    /// Move the reservation (and its stock); nothing to answer.
    Move(ReservationDecision),
    /// Record the cancellation, move the reservation if there is one, and answer StockReleased
    /// (also when nothing moves, so that the order can always finish cancelling).
    Release(ReservationDecision),
    /// Nothing to change, nothing to answer; why that is correct.
    Ignore(&'static str),
}

/// Inventory's reaction to `event` of an order in `state`. Every pair is decided here; the
/// handler only carries the reaction out (and, since an OrderRejected is ignored in every state,
/// does not read the state for one).
pub fn react(state: OrderState, event: OrderEvent) -> Result<Reaction, InvalidTransition> {
    use OrderEvent::*;
    match (state, event) {
        (_, Rejected) => Ok(Reaction::Ignore(
            "an order rejected needs nothing from inventory",
        )),
        (OrderState::Unreserved { cancelled: false }, Placed) => Ok(Reaction::Reserve),
        (OrderState::Unreserved { cancelled: true }, Placed) => Ok(Reaction::RejectCancelled),
        (OrderState::Unreserved { .. }, Confirmed) => Ok(Reaction::NotYet),
        (OrderState::Unreserved { .. }, Cancelled) => Ok(Reaction::Release(
            ReservationDecision::Ignore("nothing was reserved"),
        )),
        (OrderState::Reserved(status), Placed) => Ok(Reaction::Ignore(match status {
            ReservationStatus::Released => "the order was cancelled",
            _ => "already reserved for this order",
        })),
        (OrderState::Reserved(status), Confirmed) => {
            decide(status, ReservationInput::Commit).map(Reaction::Move)
        }
        (OrderState::Reserved(status), Cancelled) => {
            decide(status, ReservationInput::Release).map(Reaction::Release)
        }
    }
}

/// One sku's stock as the reservation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stock {
    pub available: i64,
    pub price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortage {
    pub sku: String,
    pub requested: i64,
    pub available: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveDecision {
    /// Every line can be reserved: take `lines` (one per sku, in sku order) for `total_cents`.
    Reserve { lines: Vec<Line>, total_cents: i64 },
    /// Something is short: reserve nothing. `reason` names every short or unknown sku.
    Reject {
        shortages: Vec<Shortage>,
        reason: String,
    },
}

/// Decides a reservation for `items` (sku, quantity; a sku may repeat and is then summed) against
/// `stock`, which holds the skus that exist. All lines or none.
pub fn reserve(items: &[(String, i64)], stock: &BTreeMap<String, Stock>) -> ReserveDecision {
    // Checked arithmetic throughout: quantities and prices come from events and HTTP bodies, and
    // an overflow must reject the order, never panic (debug) or wrap into a negative total.
    let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
    for (sku, quantity) in items {
        let sum = wanted.entry(sku.as_str()).or_default();
        match sum.checked_add(*quantity) {
            Some(total) => *sum = total,
            None => {
                return too_large(format!(
                    "the quantities of sku {sku} add up to more than {}",
                    i64::MAX
                ));
            }
        }
    }
    let mut lines = Vec::new();
    let mut shortages = Vec::new();
    let mut reasons = Vec::new();
    for (sku, &requested) in &wanted {
        match stock.get(*sku) {
            None => {
                shortages.push(Shortage {
                    sku: sku.to_string(),
                    requested,
                    available: 0,
                });
                reasons.push(format!("unknown sku {sku}"));
            }
            Some(s) if s.available < requested => {
                shortages.push(Shortage {
                    sku: sku.to_string(),
                    requested,
                    available: s.available,
                });
                reasons.push(format!(
                    "insufficient stock for sku {sku} (requested {requested}, available {})",
                    s.available
                ));
            }
            Some(s) => lines.push(Line {
                sku: sku.to_string(),
                quantity: requested,
                unit_price_cents: s.price_cents,
            }),
        }
    }
    if shortages.is_empty() {
        let total_cents = lines.iter().try_fold(0i64, |total, l| {
            l.quantity
                .checked_mul(l.unit_price_cents)
                .and_then(|line| total.checked_add(line))
        });
        match total_cents {
            Some(total_cents) => ReserveDecision::Reserve { lines, total_cents },
            None => too_large(format!(
                "the order total exceeds the largest amount in cents ({})",
                i64::MAX
            )),
        }
    } else {
        ReserveDecision::Reject {
            shortages,
            // Up to 100 lines of unknown skus: the reason stays within the contract's bound.
            reason: schemas::limits::bounded_reason(reasons.join("; ")),
        }
    }
}

/// The rejection of an order whose numbers do not fit: nothing short, the reason says why.
fn too_large(reason: String) -> ReserveDecision {
    ReserveDecision::Reject {
        shortages: Vec::new(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::ReservationInput::*;
    use super::ReservationStatus::*;
    use super::*;

    #[test]
    fn every_reservation_transition_is_decided_as_the_design_says() {
        let table = [
            (Reserved, Commit, "COMMITTED/Sell"),
            (Reserved, Release, "RELEASED/Unreserve"),
            (Committed, Release, "RELEASED/Return"),
            (Committed, Commit, "ignore"),
            (Released, Release, "ignore"),
            (Released, Commit, "invalid"),
        ];
        for (status, input, expected) in table {
            let got = match decide(status, input) {
                Ok(ReservationDecision::Transition { to, stock }) => format!("{to}/{stock:?}"),
                Ok(ReservationDecision::Ignore(_)) => "ignore".into(),
                Err(_) => "invalid".into(),
            };
            assert_eq!(got, expected, "{status} + {input:?}");
        }
        // The table above covers every pair.
        assert_eq!(table.len(), ReservationStatus::ALL.len() * 2);
    }

    /// The README's reservation table, every row (OrderRejected, ignored in every state, is
    /// its first sentence): (state, event, what happens), written out by hand.
    #[test]
    fn every_state_and_event_is_handled_as_the_readme_table_says() {
        use OrderEvent::*;
        use OrderState::Unreserved;
        let none = Unreserved { cancelled: false };
        let cancelled = Unreserved { cancelled: true };
        let table = [
            (none, Placed, "reserve"),
            (cancelled, Placed, "reject: cancelled first"),
            (none, Confirmed, "not yet"),
            (cancelled, Confirmed, "not yet"),
            (none, Cancelled, "record, answer StockReleased"),
            (cancelled, Cancelled, "record, answer StockReleased"),
            (OrderState::Reserved(Reserved), Placed, "ignore"),
            (OrderState::Reserved(Reserved), Confirmed, "COMMITTED/Sell"),
            (
                OrderState::Reserved(Reserved),
                Cancelled,
                "record, RELEASED/Unreserve, answer StockReleased",
            ),
            (OrderState::Reserved(Committed), Placed, "ignore"),
            (OrderState::Reserved(Committed), Confirmed, "ignore"),
            (
                OrderState::Reserved(Committed),
                Cancelled,
                "record, RELEASED/Return, answer StockReleased",
            ),
            (OrderState::Reserved(Released), Placed, "ignore"),
            (OrderState::Reserved(Released), Confirmed, "invalid"),
            (
                OrderState::Reserved(Released),
                Cancelled,
                "record, answer StockReleased",
            ),
            (none, Rejected, "ignore"),
            (cancelled, Rejected, "ignore"),
            (OrderState::Reserved(Reserved), Rejected, "ignore"),
            (OrderState::Reserved(Committed), Rejected, "ignore"),
            (OrderState::Reserved(Released), Rejected, "ignore"),
        ];
        let moved = |d: ReservationDecision| match d {
            ReservationDecision::Transition { to, stock } => Some(format!("{to}/{stock:?}")),
            ReservationDecision::Ignore(_) => None,
        };
        for (state, event, expected) in table {
            let got = match react(state, event) {
                Ok(Reaction::Reserve) => "reserve".to_owned(),
                Ok(Reaction::RejectCancelled) => "reject: cancelled first".to_owned(),
                Ok(Reaction::NotYet) => "not yet".to_owned(),
                Ok(Reaction::Move(d)) => moved(d).unwrap_or_else(|| "ignore".to_owned()),
                Ok(Reaction::Release(d)) => match moved(d) {
                    Some(m) => format!("record, {m}, answer StockReleased"),
                    None => "record, answer StockReleased".to_owned(),
                },
                Ok(Reaction::Ignore(_)) => "ignore".to_owned(),
                Err(_) => "invalid".to_owned(),
            };
            assert_eq!(got, expected, "{state:?} + {event:?}");
        }
        // Every state (none, none but cancelled, and each status) with every event.
        assert_eq!(
            table.len(),
            (2 + ReservationStatus::ALL.len()) * OrderEvent::ALL.len()
        );
    }

    /// The two OrderPlaced rows of the table that depend on the stock: every line available
    /// reserves all of them; one short reserves none and names it.
    #[test]
    fn an_order_placed_reserves_all_lines_or_none() {
        let stock = stock(&[("A", 5, 100), ("B", 1, 250)]);
        assert!(matches!(
            reserve(&[("A".into(), 5), ("B".into(), 1)], &stock),
            ReserveDecision::Reserve {
                total_cents: 750,
                ..
            }
        ));
        assert!(matches!(
            reserve(&[("A".into(), 5), ("B".into(), 2)], &stock),
            ReserveDecision::Reject { shortages, .. } if shortages.len() == 1 && shortages[0].sku == "B"
        ));
    }

    fn stock(entries: &[(&str, i64, i64)]) -> BTreeMap<String, Stock> {
        entries
            .iter()
            .map(|(sku, available, price_cents)| {
                (
                    sku.to_string(),
                    Stock {
                        available: *available,
                        price_cents: *price_cents,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn an_order_within_stock_is_reserved_with_prices_and_total() {
        let decision = reserve(
            &[("B".into(), 2), ("A".into(), 1)],
            &stock(&[("A", 5, 100), ("B", 2, 250)]),
        );
        assert_eq!(
            decision,
            ReserveDecision::Reserve {
                lines: vec![
                    Line {
                        sku: "A".into(),
                        quantity: 1,
                        unit_price_cents: 100
                    },
                    Line {
                        sku: "B".into(),
                        quantity: 2,
                        unit_price_cents: 250
                    },
                ],
                total_cents: 600,
            }
        );
    }

    #[test]
    fn a_total_that_overflows_rejects_the_order_instead_of_wrapping() {
        let stock = stock(&[("A", 10, i64::MAX)]);
        let decision = reserve(&[("A".into(), 2)], &stock);
        assert!(
            matches!(&decision, ReserveDecision::Reject { shortages, reason }
                if shortages.is_empty() && reason.contains("order total exceeds")),
            "{decision:?}"
        );
    }

    #[test]
    fn quantities_that_overflow_when_summed_reject_the_order() {
        let stock = stock(&[("A", 1, 10)]);
        let decision = reserve(&[("A".into(), i64::MAX), ("A".into(), 1)], &stock);
        assert!(
            matches!(&decision, ReserveDecision::Reject { reason, .. } if reason.contains("add up to more than")),
            "{decision:?}"
        );
    }

    #[test]
    fn repeated_skus_are_summed_before_checking_stock() {
        let decision = reserve(
            &[("A".into(), 2), ("A".into(), 2)],
            &stock(&[("A", 3, 100)]),
        );
        assert_eq!(
            decision,
            ReserveDecision::Reject {
                shortages: vec![Shortage {
                    sku: "A".into(),
                    requested: 4,
                    available: 3
                }],
                reason: "insufficient stock for sku A (requested 4, available 3)".into(),
            }
        );
    }

    #[test]
    fn an_unknown_sku_rejects_the_whole_order_and_is_named() {
        let decision = reserve(
            &[("A".into(), 1), ("NOPE".into(), 1)],
            &stock(&[("A", 3, 100)]),
        );
        let ReserveDecision::Reject { shortages, reason } = decision else {
            panic!("expected a rejection");
        };
        assert_eq!(shortages.len(), 1);
        assert_eq!(reason, "unknown sku NOPE");
    }
}
