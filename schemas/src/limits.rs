//! The contract's bounds on money, stock, quantities, counts and text, shared by the HTTP APIs
//! and the event consumers, and [`validate`], which checks a decoded event against them.
//!
//! The bounds are chosen so that no sum the saga computes can overflow an `i64`: an order has at
//! most [`MAX_ITEMS`] lines of at most [`MAX_QUANTITY`] units at most [`MAX_PRICE_CENTS`] each, so
//! its total is at most 10^18 cents (below `i64::MAX`, about 9.2 × 10^18). The arithmetic is
//! checked anyway; the bounds make the checks unreachable for valid input.
//!
//! An event that breaks a bound never has an effect: the consumer dead-letters it as permanent
//! with the reason [`validate`] gives (a forged `OrderPlaced` with a negative quantity would
//! otherwise move other orders' reserved units back to available).

use crate::events::{Event, OrderItem, ReservedLine, Shortage};
use crate::sku::validate_sku;

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

/// Checks `event` against the contract's bounds; the error names the field and the bound.
pub fn validate(event: &Event) -> Result<(), String> {
    match event {
        Event::OrderPlaced(e) => {
            time("placed_at", e.placed_at)?;
            count("items", e.items.len(), 1)?;
            for (i, OrderItem { sku, quantity }) in e.items.iter().enumerate() {
                sku_at("items", i, sku)?;
                range(&format!("items[{i}].quantity"), *quantity, 1, MAX_QUANTITY)?;
            }
            Ok(())
        }
        Event::OrderConfirmed(e) => {
            time("confirmed_at", e.confirmed_at)?;
            range("total_cents", e.total_cents, 0, MAX_TOTAL_CENTS)
        }
        Event::OrderRejected(e) => {
            time("rejected_at", e.rejected_at)?;
            reason(&e.reason)
        }
        Event::OrderCancelled(e) => time("cancelled_at", e.cancelled_at),
        Event::StockReserved(e) => {
            time("reserved_at", e.reserved_at)?;
            count("lines", e.lines.len(), 1)?;
            let mut total = Some(0i64);
            for (i, line) in e.lines.iter().enumerate() {
                let ReservedLine {
                    sku,
                    quantity,
                    unit_price_cents,
                } = line;
                sku_at("lines", i, sku)?;
                // A line sums the order's lines of one sku.
                let most = MAX_QUANTITY * MAX_ITEMS as i64;
                range(&format!("lines[{i}].quantity"), *quantity, 1, most)?;
                range(
                    &format!("lines[{i}].unit_price_cents"),
                    *unit_price_cents,
                    0,
                    MAX_PRICE_CENTS,
                )?;
                total = total.and_then(|t| t.checked_add(quantity.checked_mul(*unit_price_cents)?));
            }
            range("total_cents", e.total_cents, 0, MAX_TOTAL_CENTS)?;
            if total != Some(e.total_cents) {
                let sum =
                    total.map_or("more than the largest amount".to_owned(), |t| t.to_string());
                return Err(format!(
                    "total_cents {} is not the sum of its lines ({sum})",
                    e.total_cents
                ));
            }
            Ok(())
        }
        Event::StockReservationRejected(e) => {
            time("rejected_at", e.rejected_at)?;
            reason(&e.reason)?;
            count("shortages", e.shortages.len(), 0)?;
            for (i, shortage) in e.shortages.iter().enumerate() {
                let Shortage {
                    sku,
                    requested,
                    available,
                } = shortage;
                sku_at("shortages", i, sku)?;
                let most = MAX_QUANTITY * MAX_ITEMS as i64;
                range(&format!("shortages[{i}].requested"), *requested, 1, most)?;
                range(
                    &format!("shortages[{i}].available"),
                    *available,
                    0,
                    MAX_STOCK,
                )?;
            }
            Ok(())
        }
        Event::StockReleased(e) => {
            time("released_at", e.released_at)?;
            reason(&e.reason)
        }
    }
}

fn range(field: &str, value: i64, min: i64, max: i64) -> Result<(), String> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "{field} must be between {min} and {max}, got {value}"
        ))
    }
}

fn count(field: &str, len: usize, min: usize) -> Result<(), String> {
    if (min..=MAX_ITEMS).contains(&len) {
        Ok(())
    } else {
        Err(format!(
            "{field} must have {min} to {MAX_ITEMS} entries, got {len}"
        ))
    }
}

fn sku_at(field: &str, i: usize, sku: &str) -> Result<(), String> {
    validate_sku(sku).map_err(|e| format!("{field}[{i}].sku: {}", crate::error::bounded(e)))
}

fn time(field: &str, millis: i64) -> Result<(), String> {
    range(field, millis, 0, MAX_TIME_MILLIS)
}

fn reason(text: &str) -> Result<(), String> {
    let chars = text.chars().count();
    if chars > MAX_REASON_CHARS {
        Err(format!(
            "reason must have at most {MAX_REASON_CHARS} characters, got {chars}"
        ))
    } else if text.contains('\0') {
        // Postgres text cannot hold NUL: the consumer that stores the reason would fail.
        Err("reason must not contain NUL characters".to_owned())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            let err = validate(&placed(vec![("A", 1), ("B", quantity)])).unwrap_err();
            assert!(
                err.starts_with("items[1].quantity must be between 1"),
                "{err}"
            );
        }
    }

    #[test]
    fn empty_or_too_long_orders_and_bad_skus_are_refused() {
        assert!(
            validate(&placed(vec![]))
                .unwrap_err()
                .contains("items must have 1 to 100")
        );
        let many: Vec<_> = (0..=MAX_ITEMS).map(|_| ("A", 1)).collect();
        assert!(validate(&placed(many)).unwrap_err().contains("got 101"));
        let long = "x".repeat(10_000);
        let err = validate(&placed(vec![(long.as_str(), 1)])).unwrap_err();
        assert!(err.starts_with("items[0].sku"), "{err}");
        assert!(
            err.len() < 400,
            "the error echoes a bounded sku: {} bytes",
            err.len()
        );
    }

    #[test]
    fn a_reservation_must_add_up_and_stay_within_the_price_bound() {
        assert_eq!(validate(&reserved(vec![(2, 150), (1, 50)], 350)), Ok(()));
        assert!(
            validate(&reserved(vec![(2, 150)], 299))
                .unwrap_err()
                .contains("not the sum of its lines (300)")
        );
        assert!(
            validate(&reserved(vec![(2, -150)], -300))
                .unwrap_err()
                .contains("unit_price_cents")
        );
        assert!(
            validate(&reserved(vec![(2, i64::MAX)], 0))
                .unwrap_err()
                .contains("unit_price_cents")
        );
        assert!(validate(&reserved(vec![(2, 10)], i64::MIN)).is_err());
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
        assert!(validate(&rejected("x".repeat(MAX_REASON_CHARS + 1), 0)).is_err());
        assert!(validate(&rejected("no".into(), -1)).is_err());
        assert!(validate(&rejected("no\0stock".into(), 0)).is_err());
        assert!(validate(&rejected("no".into(), i64::MAX)).is_err());
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
