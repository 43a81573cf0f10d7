//! The contract's bounds on money, stock, quantities, counts and text, shared by the HTTP APIs
//! and the event consumers, and each event record's check against them ([`WithinContract`]).
//!
//! The bounds are chosen so that no sum the saga computes can overflow an `i64`: an order has at
//! most [`MAX_ITEMS`] lines of at most [`MAX_QUANTITY`] units at most [`MAX_PRICE_CENTS`] each, so
//! its total is at most 10^18 cents (below `i64::MAX`, about 9.2 × 10^18). The arithmetic is
//! checked anyway; the bounds make the checks unreachable for valid input.
//!
//! An event that breaks a bound never has an effect: the consumer dead-letters it as permanent
//! with the reason its check gives (a forged `OrderPlaced` with a negative quantity would
//! otherwise move other orders' reserved units back to available).

use crate::events::{
    OrderAwaitingPayment, OrderCancelled, OrderConfirmed, OrderItem, OrderPlaced,
    OrderRefundRequested, OrderRejected, PaymentConfirmed, PaymentDeclined, PaymentRefunded,
    ReservedLine, Shortage, StockReleased, StockReservationRejected, StockReserved,
};
use crate::sku::{SkuError, validate_sku};

/// Lines in one order (and reserved lines or shortages in one inventory event).
pub const MAX_ITEMS: usize = 100;
/// Units of one line.
pub const MAX_QUANTITY: i64 = 1_000_000;
/// Price of one unit: 100,000,000.00 in cents.
pub const MAX_PRICE_CENTS: i64 = 10_000_000_000;
/// Stock of one product in one field (available, reserved or sold).
pub const MAX_STOCK: i64 = 1_000_000_000_000;
/// The largest order total: every line at the largest quantity and price.
pub const MAX_TOTAL_CENTS: i64 = MAX_ITEMS as i64 * MAX_QUANTITY * MAX_PRICE_CENTS;
/// Characters of a reason (rejections, releases).
pub const MAX_REASON_CHARS: usize = 1_000;
/// Characters of a processor's decline code (`over_limit`, `do_not_honor`).
pub const MAX_CODE_CHARS: usize = 64;
/// The latest valid event time: 9999-12-31T23:59:59.999Z in Unix milliseconds.
pub const MAX_TIME_MILLIS: i64 = 253_402_300_799_999;

/// Cuts `text` to [`MAX_REASON_CHARS`] characters (ending with `…` when cut), so that a reason
/// built from many parts stays within the contract.
pub fn bounded_reason(text: String) -> String {
    truncate_chars(text, MAX_REASON_CHARS)
}

/// Cuts `text` to at most `max` characters (`max` ≥ 1), the last one `…` when it was cut: for
/// text that echoes input (headers, keys, library errors quoting values) into reasons and logs.
pub fn truncate_chars(text: impl Into<String>, max: usize) -> String {
    let mut text = text.into();
    if let Some((cut, _)) = text.char_indices().nth(max.saturating_sub(1))
        && text.chars().count() > max
    {
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// How an event breaks the contract: the field and the bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    /// A number outside its range.
    #[error("{field} must be between {min} and {max}, got {value}")]
    OutOfRange {
        field: String,
        value: i64,
        min: i64,
        max: i64,
    },
    /// A list with too few or too many entries.
    #[error("{field} must have {min} to {max} entries, got {len}")]
    Count {
        field: &'static str,
        len: usize,
        min: usize,
        max: usize,
    },
    /// A sku that is not one ([`crate::sku`]).
    #[error("{field}: {error}")]
    Sku { field: String, error: SkuError },
    /// A reservation whose total is not the sum of its lines (`None`: the sum overflows).
    #[error("total_cents {total_cents} is not the sum of its lines ({})",
        sum.map_or("more than the largest amount".to_owned(), |t| t.to_string()))]
    TotalMismatch { total_cents: i64, sum: Option<i64> },
    /// A reason longer than [`MAX_REASON_CHARS`].
    #[error("reason must have at most {MAX_REASON_CHARS} characters, got {chars}")]
    ReasonTooLong { chars: usize },
    /// A reason with a NUL character, which Postgres text cannot hold (the consumer that stores
    /// the reason would fail).
    #[error("reason must not contain NUL characters")]
    ReasonHasNul,
    /// A short text field (a code) that is empty, too long or not plain ASCII.
    #[error("{field} must be 1 to {max} characters of ASCII letters, digits and _-., got {text:?}")]
    BadCode {
        field: &'static str,
        text: String,
        max: usize,
    },
}

/// An event record's bounds. Every struct that [`crate::events`] lists implements it, so an
/// event without bounds does not compile; [`Event::check_bounds`] dispatches to it.
pub trait WithinContract {
    /// Checks the record against the contract's bounds; the error names the field and the bound.
    fn check(&self) -> Result<(), BoundsError>;
}

impl WithinContract for OrderPlaced {
    fn check(&self) -> Result<(), BoundsError> {
        time("placed_at", self.placed_at)?;
        count("items", self.items.len(), 1)?;
        for (i, OrderItem { sku, quantity }) in self.items.iter().enumerate() {
            sku_at("items", i, sku)?;
            range(format!("items[{i}].quantity"), *quantity, 1, MAX_QUANTITY)?;
        }
        Ok(())
    }
}

impl WithinContract for OrderAwaitingPayment {
    fn check(&self) -> Result<(), BoundsError> {
        time("at", self.at)?;
        time("pay_by", self.pay_by)?;
        range("amount_cents", self.amount_cents, 0, MAX_TOTAL_CENTS)
    }
}

impl WithinContract for OrderRefundRequested {
    fn check(&self) -> Result<(), BoundsError> {
        time("requested_at", self.requested_at)?;
        range("amount_cents", self.amount_cents, 0, MAX_TOTAL_CENTS)
    }
}

impl WithinContract for PaymentConfirmed {
    fn check(&self) -> Result<(), BoundsError> {
        time("confirmed_at", self.confirmed_at)?;
        range("amount_cents", self.amount_cents, 0, MAX_TOTAL_CENTS)
    }
}

impl WithinContract for PaymentDeclined {
    fn check(&self) -> Result<(), BoundsError> {
        time("declined_at", self.declined_at)?;
        reason(&self.reason)?;
        code("decline_code", &self.decline_code)
    }
}

impl WithinContract for PaymentRefunded {
    fn check(&self) -> Result<(), BoundsError> {
        time("refunded_at", self.refunded_at)?;
        range("refunded_cents", self.refunded_cents, 0, MAX_TOTAL_CENTS)
    }
}

impl WithinContract for OrderConfirmed {
    fn check(&self) -> Result<(), BoundsError> {
        time("confirmed_at", self.confirmed_at)?;
        range("total_cents", self.total_cents, 0, MAX_TOTAL_CENTS)
    }
}

impl WithinContract for OrderRejected {
    fn check(&self) -> Result<(), BoundsError> {
        time("rejected_at", self.rejected_at)?;
        reason(&self.reason)
    }
}

impl WithinContract for OrderCancelled {
    fn check(&self) -> Result<(), BoundsError> {
        time("cancelled_at", self.cancelled_at)
    }
}

impl WithinContract for StockReserved {
    fn check(&self) -> Result<(), BoundsError> {
        time("reserved_at", self.reserved_at)?;
        count("lines", self.lines.len(), 1)?;
        let mut total = Some(0i64);
        for (i, line) in self.lines.iter().enumerate() {
            let ReservedLine {
                sku,
                quantity,
                unit_price_cents,
            } = line;
            sku_at("lines", i, sku)?;
            // A line sums the order's lines of one sku.
            let most = MAX_QUANTITY * MAX_ITEMS as i64;
            range(format!("lines[{i}].quantity"), *quantity, 1, most)?;
            range(
                format!("lines[{i}].unit_price_cents"),
                *unit_price_cents,
                0,
                MAX_PRICE_CENTS,
            )?;
            total = total.and_then(|t| t.checked_add(quantity.checked_mul(*unit_price_cents)?));
        }
        range("total_cents", self.total_cents, 0, MAX_TOTAL_CENTS)?;
        if total != Some(self.total_cents) {
            return Err(BoundsError::TotalMismatch {
                total_cents: self.total_cents,
                sum: total,
            });
        }
        Ok(())
    }
}

impl WithinContract for StockReservationRejected {
    fn check(&self) -> Result<(), BoundsError> {
        time("rejected_at", self.rejected_at)?;
        reason(&self.reason)?;
        count("shortages", self.shortages.len(), 0)?;
        for (i, shortage) in self.shortages.iter().enumerate() {
            let Shortage {
                sku,
                requested,
                available,
            } = shortage;
            sku_at("shortages", i, sku)?;
            let most = MAX_QUANTITY * MAX_ITEMS as i64;
            range(format!("shortages[{i}].requested"), *requested, 1, most)?;
            range(
                format!("shortages[{i}].available"),
                *available,
                0,
                MAX_STOCK,
            )?;
        }
        Ok(())
    }
}

impl WithinContract for StockReleased {
    fn check(&self) -> Result<(), BoundsError> {
        time("released_at", self.released_at)?;
        reason(&self.reason)
    }
}

fn range(field: impl Into<String>, value: i64, min: i64, max: i64) -> Result<(), BoundsError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(BoundsError::OutOfRange {
            field: field.into(),
            value,
            min,
            max,
        })
    }
}

fn count(field: &'static str, len: usize, min: usize) -> Result<(), BoundsError> {
    if (min..=MAX_ITEMS).contains(&len) {
        Ok(())
    } else {
        Err(BoundsError::Count {
            field,
            len,
            min,
            max: MAX_ITEMS,
        })
    }
}

fn sku_at(field: &str, i: usize, sku: &str) -> Result<(), BoundsError> {
    validate_sku(sku).map_err(|error| BoundsError::Sku {
        field: format!("{field}[{i}].sku"),
        error,
    })
}

fn time(field: &str, millis: i64) -> Result<(), BoundsError> {
    range(field, millis, 0, MAX_TIME_MILLIS)
}

fn code(field: &'static str, text: &str) -> Result<(), BoundsError> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-.".contains(c);
    if (1..=MAX_CODE_CHARS).contains(&text.len()) && text.chars().all(plain) {
        Ok(())
    } else {
        Err(BoundsError::BadCode {
            field,
            text: truncate_chars(text, MAX_CODE_CHARS + 1),
            max: MAX_CODE_CHARS,
        })
    }
}

fn reason(text: &str) -> Result<(), BoundsError> {
    let chars = text.chars().count();
    if chars > MAX_REASON_CHARS {
        Err(BoundsError::ReasonTooLong { chars })
    } else if text.contains('\0') {
        Err(BoundsError::ReasonHasNul)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(event: &Event) -> Result<(), BoundsError> {
        event.check_bounds()
    }
    use crate::events::*;
    use uuid::Uuid;

    fn placed(items: Vec<(&str, i64)>) -> Event {
        Event::OrderPlaced(OrderPlaced {
            order_id: Uuid::new_v4(),
            customer_id: Uuid::new_v4(),
            items: items
                .into_iter()
                .map(|(sku, quantity)| OrderItem {
                    sku: sku.into(),
                    quantity,
                })
                .collect(),
            placed_at: 1_700_000_000_000,
        })
    }

    fn reserved(lines: Vec<(i64, i64)>, total_cents: i64) -> Event {
        Event::StockReserved(StockReserved {
            order_id: Uuid::new_v4(),
            reservation_id: Uuid::new_v4(),
            lines: lines
                .into_iter()
                .map(|(quantity, unit_price_cents)| ReservedLine {
                    sku: "A".into(),
                    quantity,
                    unit_price_cents,
                })
                .collect(),
            total_cents,
            reserved_at: 1_700_000_000_000,
        })
    }

    #[test]
    fn the_largest_order_total_fits_in_an_i64() {
        assert_eq!(MAX_TOTAL_CENTS, 1_000_000_000_000_000_000);
    }

    #[test]
    fn an_order_placed_within_the_bounds_is_valid() {
        assert_eq!(
            validate(&placed(vec![("A", 1), ("B", MAX_QUANTITY)])),
            Ok(())
        );
        let most: Vec<_> = (0..MAX_ITEMS).map(|_| ("A", MAX_QUANTITY)).collect();
        assert_eq!(validate(&placed(most)), Ok(()));
    }

    #[test]
    fn negative_zero_or_huge_quantities_are_refused() {
        for quantity in [-1, 0, MAX_QUANTITY + 1, i64::MIN, i64::MAX] {
            assert_eq!(
                validate(&placed(vec![("A", 1), ("B", quantity)])),
                Err(BoundsError::OutOfRange {
                    field: "items[1].quantity".into(),
                    value: quantity,
                    min: 1,
                    max: MAX_QUANTITY
                })
            );
        }
    }

    #[test]
    fn empty_or_too_long_orders_and_bad_skus_are_refused() {
        let items = |len| BoundsError::Count {
            field: "items",
            len,
            min: 1,
            max: MAX_ITEMS,
        };
        assert_eq!(validate(&placed(vec![])), Err(items(0)));
        let many: Vec<_> = (0..=MAX_ITEMS).map(|_| ("A", 1)).collect();
        assert_eq!(validate(&placed(many)), Err(items(101)));
        let long = "x".repeat(10_000);
        let err = validate(&placed(vec![(long.as_str(), 1)])).unwrap_err();
        assert_eq!(
            err,
            BoundsError::Sku {
                field: "items[0].sku".into(),
                error: SkuError::Length { len: 10_000 }
            }
        );
        assert!(
            err.to_string().len() < 400,
            "the error does not echo a long sku: {err}"
        );
    }

    #[test]
    fn a_reservation_must_add_up_and_stay_within_the_price_bound() {
        assert_eq!(validate(&reserved(vec![(2, 150), (1, 50)], 350)), Ok(()));
        assert_eq!(
            validate(&reserved(vec![(2, 150)], 299)),
            Err(BoundsError::TotalMismatch {
                total_cents: 299,
                sum: Some(300)
            })
        );
        let price = |value| BoundsError::OutOfRange {
            field: "lines[0].unit_price_cents".into(),
            value,
            min: 0,
            max: MAX_PRICE_CENTS,
        };
        assert_eq!(validate(&reserved(vec![(2, -150)], -300)), Err(price(-150)));
        assert_eq!(
            validate(&reserved(vec![(2, i64::MAX)], 0)),
            Err(price(i64::MAX))
        );
        assert!(matches!(
            validate(&reserved(vec![(2, 10)], i64::MIN)),
            Err(BoundsError::OutOfRange { field, .. }) if field == "total_cents"
        ));
    }

    #[test]
    fn reasons_and_times_are_bounded() {
        let rejected = |reason: String, at: i64| {
            Event::OrderRejected(OrderRejected {
                order_id: Uuid::new_v4(),
                reason,
                rejected_at: at,
            })
        };
        assert_eq!(validate(&rejected("no".into(), 0)), Ok(()));
        assert_eq!(
            validate(&rejected("x".repeat(MAX_REASON_CHARS + 1), 0)),
            Err(BoundsError::ReasonTooLong {
                chars: MAX_REASON_CHARS + 1
            })
        );
        let at = |value| BoundsError::OutOfRange {
            field: "rejected_at".into(),
            value,
            min: 0,
            max: MAX_TIME_MILLIS,
        };
        assert_eq!(validate(&rejected("no".into(), -1)), Err(at(-1)));
        assert_eq!(
            validate(&rejected("no\0stock".into(), 0)),
            Err(BoundsError::ReasonHasNul)
        );
        assert_eq!(
            validate(&rejected("no".into(), i64::MAX)),
            Err(at(i64::MAX))
        );
    }

    #[test]
    fn truncate_chars_keeps_short_text_and_cuts_long_text_on_a_char_boundary() {
        assert_eq!(truncate_chars("abc", 3), "abc");
        assert_eq!(truncate_chars("abcd", 3), "ab…");
        assert_eq!(truncate_chars("ééééé", 2), "é…");
        assert_eq!(truncate_chars("", 1), "");
    }

    #[test]
    fn bounded_reason_cuts_long_text_to_the_contract() {
        assert_eq!(bounded_reason("short".into()), "short");
        let cut = bounded_reason("é".repeat(5_000));
        assert_eq!(cut.chars().count(), MAX_REASON_CHARS);
        assert!(cut.ends_with('…'));
        assert_eq!(
            validate(&Event::OrderRejected(OrderRejected {
                order_id: Uuid::new_v4(),
                reason: cut,
                rejected_at: 0,
            })),
            Ok(())
        );
    }
}
