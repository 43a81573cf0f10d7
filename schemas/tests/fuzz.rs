//! The event decoders fuzzed with proptest: random bytes, valid encodings cut, extended and with
//! bytes flipped, and events with arbitrary field values, through both the Avro and the JSON
//! decoder. Whatever comes in, decoding returns (it never panics), and what it accepts is an
//! event within the contract's bounds that encodes back to the same event.
//!
//! `FUZZ_CASES` sets the number of cases per property (default 2,000, what the test suite runs);
//! the README reports a run of a million (`FUZZ_CASES=250000` for each of four properties).

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use schemas::{
    CancelReason, DecodeError, Event, OrderAwaitingPayment, OrderCancelled, OrderConfirmed,
    OrderItem, OrderPlaced, OrderRefundRequested, OrderRejected, PaymentConfirmed, PaymentDeclined,
    PaymentRefunded, ReservedLine, Shortage, StockReleased, StockReservationRejected,
    StockReserved, Uuid, decode, decode_json, decode_with_content_type, encode, encode_json,
    limits,
};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

/// Numbers around every bound and at the extremes, and anything else.
fn number() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(i64::MIN),
        Just(i64::MAX),
        Just(-1i64),
        Just(0i64),
        Just(1i64),
        Just(limits::MAX_QUANTITY),
        Just(limits::MAX_QUANTITY + 1),
        Just(limits::MAX_PRICE_CENTS),
        Just(limits::MAX_PRICE_CENTS + 1),
        Just(limits::MAX_TOTAL_CENTS),
        Just(limits::MAX_TIME_MILLIS + 1),
        -5i64..1_000_000_000,
        any::<i64>(),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9._-]{1,64}",
        ".{0,80}",
        Just("x".repeat(limits::MAX_REASON_CHARS + 1)),
        Just(String::new()),
    ]
}

fn id() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn reason() -> impl Strategy<Value = CancelReason> {
    prop_oneof![
        Just(CancelReason::CustomerRequest),
        Just(CancelReason::DeadlineExceeded),
        Just(CancelReason::PaymentDeclined),
        Just(CancelReason::PaymentTimeout),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let items = proptest::collection::vec((text(), number()), 0..4);
    prop_oneof![
        (id(), id(), items, number()).prop_map(|(o, c, items, at)| {
            OrderPlaced {
                order_id: o,
                customer_id: c,
                items: items
                    .into_iter()
                    .map(|(sku, quantity)| OrderItem { sku, quantity })
                    .collect(),
                placed_at: at,
            }
            .into()
        }),
        (id(), number(), number()).prop_map(|(o, total, at)| {
            OrderConfirmed {
                order_id: o,
                total_cents: total,
                confirmed_at: at,
            }
            .into()
        }),
        (id(), text(), number()).prop_map(|(o, reason, at)| {
            OrderRejected {
                order_id: o,
                reason,
                rejected_at: at,
            }
            .into()
        }),
        (id(), reason(), number()).prop_map(|(o, reason, at)| {
            OrderCancelled {
                order_id: o,
                reason,
                cancelled_at: at,
            }
            .into()
        }),
        (id(), id(), number(), number(), number()).prop_map(|(o, c, amount, by, at)| {
            OrderAwaitingPayment {
                order_id: o,
                customer_id: c,
                amount_cents: amount,
                pay_by: by,
                at,
            }
            .into()
        }),
        (id(), number(), reason(), number()).prop_map(|(o, amount, reason, at)| {
            OrderRefundRequested {
                order_id: o,
                amount_cents: amount,
                reason,
                requested_at: at,
            }
            .into()
        }),
        (id(), id(), number(), number()).prop_map(|(o, p, amount, at)| {
            PaymentConfirmed {
                order_id: o,
                payment_id: p,
                amount_cents: amount,
                confirmed_at: at,
            }
            .into()
        }),
        (id(), id(), text(), text(), number()).prop_map(|(o, p, reason, code, at)| {
            PaymentDeclined {
                order_id: o,
                payment_id: p,
                reason,
                decline_code: code,
                declined_at: at,
            }
            .into()
        }),
        (id(), id(), number(), number()).prop_map(|(o, p, refunded, at)| {
            PaymentRefunded {
                order_id: o,
                payment_id: p,
                refunded_cents: refunded,
                refunded_at: at,
            }
            .into()
        }),
        (
            id(),
            id(),
            proptest::collection::vec((text(), number(), number()), 0..4),
            number(),
            number()
        )
            .prop_map(|(o, r, lines, total, at)| {
                StockReserved {
                    order_id: o,
                    reservation_id: r,
                    lines: lines
                        .into_iter()
                        .map(|(sku, quantity, unit_price_cents)| ReservedLine {
                            sku,
                            quantity,
                            unit_price_cents,
                        })
                        .collect(),
                    total_cents: total,
                    reserved_at: at,
                }
                .into()
            }),
        (
            id(),
            text(),
            proptest::collection::vec((text(), number(), number()), 0..4),
            number()
        )
            .prop_map(|(o, reason, shortages, at)| {
                StockReservationRejected {
                    order_id: o,
                    reason,
                    shortages: shortages
                        .into_iter()
                        .map(|(sku, requested, available)| Shortage {
                            sku,
                            requested,
                            available,
                        })
                        .collect(),
                    rejected_at: at,
                }
                .into()
            }),
        (id(), id(), text(), number()).prop_map(|(o, r, reason, at)| {
            StockReleased {
                order_id: o,
                reservation_id: r,
                reason,
                released_at: at,
            }
            .into()
        }),
    ]
}

/// What every accepted event must be: within the bounds, and the same after a round trip.
fn accepted_is_sound(event: &Event) -> Result<(), TestCaseError> {
    prop_assert_eq!(event.check_bounds(), Ok(()));
    let back = decode(&encode(event));
    prop_assert_eq!(back.as_ref(), Ok(event));
    Ok(())
}

#[test]
fn any_event_decodes_to_itself_when_within_bounds_and_is_refused_otherwise() {
    runner()
        .run(&event(), |event| {
            let valid = event.check_bounds().is_ok();
            for decoded in [
                decode(&encode(&event)),
                decode_json(event.event_type(), &encode_json(&event)),
            ] {
                match decoded {
                    Ok(back) => {
                        prop_assert!(valid, "accepted an event outside the bounds: {:?}", back);
                        prop_assert_eq!(&back, &event);
                    }
                    Err(DecodeError::OutOfBounds { .. }) => prop_assert!(!valid),
                    Err(e) => prop_assert!(false, "an encodable event failed to decode: {e}"),
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn random_bytes_never_panic_the_decoders() {
    let bytes = proptest::collection::vec(any::<u8>(), 0..512);
    let types = prop_oneof![
        Just(None),
        proptest::sample::select(Event::EVENT_TYPES.to_vec()).prop_map(Some),
        Just(Some("Nope")),
    ];
    runner()
        .run(
            &(bytes, types, any::<bool>()),
            |(bytes, event_type, json)| {
                let content_type = json.then_some("application/json");
                if let Ok(event) = decode_with_content_type(content_type, event_type, &bytes) {
                    accepted_is_sound(&event)?;
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn valid_encodings_cut_extended_or_flipped_never_panic_the_decoders() {
    let damage = (any::<usize>(), any::<u8>(), 0u8..4);
    runner()
        .run(
            &(event(), damage, any::<bool>()),
            |(event, (at, byte, how), json)| {
                let mut bytes = if json {
                    encode_json(&event)
                } else {
                    encode(&event)
                };
                let at = at % (bytes.len() + 1);
                match how {
                    0 => bytes.truncate(at),
                    1 => bytes.insert(at, byte),
                    2 if at < bytes.len() => bytes[at] ^= byte | 1,
                    _ => bytes.extend(std::iter::repeat_n(byte, at % 64)),
                }
                let decoded = if json {
                    decode_json(event.event_type(), &bytes)
                } else {
                    decode(&bytes)
                };
                if let Ok(event) = decoded {
                    accepted_is_sound(&event)?;
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn json_shaped_garbage_never_panics_the_json_decoder() {
    let value = proptest::arbitrary::any::<(String, i64, bool)>().prop_map(|(s, n, b)| {
        format!(r#"{{"order_id":"{s}","items":[{{"sku":"{s}","quantity":{n}}}],"flag":{b}}}"#)
    });
    let raw = prop_oneof![value, ".{0,200}"];
    runner()
        .run(
            &(raw, proptest::sample::select(Event::EVENT_TYPES.to_vec())),
            |(raw, event_type)| {
                if let Ok(event) = decode_json(event_type, raw.as_bytes()) {
                    accepted_is_sound(&event)?;
                }
                Ok(())
            },
        )
        .unwrap();
}
