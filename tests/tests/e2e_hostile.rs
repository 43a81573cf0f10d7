//! Hostile Kafka records: garbage, truncated, oversized, out of the contract's bounds and with
//! forged headers, produced to the topics while real orders run. Every one must land in its
//! consuming group's DLQ with a reason, no process may exit, and every real order must finish
//! with its stock conserved.

use std::collections::HashMap;
use std::time::Duration;

use e2e::kafka::{self, Delivery, Outgoing};
use e2e::{Stack, StackOptions, eventually};
use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use schemas::{
    CancelReason, Event, OrderCancelled, OrderItem, OrderPlaced, ReservedLine, StockReserved,
    encode, encode_json,
};
use serde_json::json;
use uuid::Uuid;

const T0: i64 = 1_732_252_800_000;

/// One hostile record and what its dead letter's reason must say.
struct Hostile {
    record: Outgoing,
    /// The dead-letter topic it must land in.
    dlq: &'static str,
    reason: &'static str,
    /// Too large to copy: the dead letter is a stub without the value.
    stub: bool,
}

fn headers(pairs: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
        .collect()
}

fn saga_headers(message_id: &str, event_type: &str, content_type: &str) -> Vec<(String, Vec<u8>)> {
    headers(&[
        ("message-id", message_id.as_bytes()),
        ("event-type", event_type.as_bytes()),
        ("content-type", content_type.as_bytes()),
    ])
}

fn placed(order_id: Uuid, sku: &str, quantity: i64) -> Event {
    OrderPlaced {
        order_id,
        customer_id: Uuid::new_v4(),
        items: vec![OrderItem {
            sku: sku.to_owned(),
            quantity,
        }],
        placed_at: T0,
    }
    .into()
}

/// The `i`-th hostile record of the mix (ten kinds in turn), against sku `sku` (stocked: a
/// negative quantity that got through would change its stock).
fn hostile(i: usize, sku: &str, rng: &mut StdRng) -> Hostile {
    let orders = schemas::ORDERS_TOPIC.to_owned();
    let inventory = schemas::INVENTORY_TOPIC.to_owned();
    let order_id = Uuid::new_v4();
    let key = Some(order_id.to_string().into_bytes());
    let message_id = Uuid::new_v4().to_string();
    let avro = "avro/binary";
    let json = "application/json";
    let to_inventory = |record: Outgoing, reason: &'static str| Hostile {
        record,
        dlq: "inventory-service.dlq",
        reason,
        stub: false,
    };
    match i % 10 {
        // Random bytes and no headers at all.
        0 => {
            let len = rng.random_range(0..300);
            let payload: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            to_inventory(
                Outgoing {
                    topic: orders,
                    payload: Some(payload),
                    ..Outgoing::default()
                },
                "no message-id header",
            )
        }
        // Saga headers, random bytes that are not Avro single-object encoding.
        1 => {
            let mut payload: Vec<u8> = (0..rng.random_range(10..200))
                .map(|_| rng.random())
                .collect();
            payload[0] = 0;
            to_inventory(
                Outgoing {
                    topic: orders,
                    key,
                    headers: saga_headers(&message_id, "OrderPlaced", avro),
                    payload: Some(payload),
                },
                "single-object marker",
            )
        }
        // A valid event, truncated.
        2 => {
            let bytes = encode(&placed(order_id, sku, 1));
            let cut = rng.random_range(10..bytes.len());
            to_inventory(
                Outgoing {
                    topic: orders,
                    key,
                    headers: saga_headers(&message_id, "OrderPlaced", avro),
                    payload: Some(bytes[..cut].to_vec()),
                },
                "corrupt Avro body",
            )
        }
        // JSON that is not the event.
        3 => to_inventory(
            Outgoing {
                topic: orders,
                key,
                headers: saga_headers(&message_id, "OrderPlaced", json),
                payload: Some(
                    json!({"order_id": order_id, "items": "lots", "free": true})
                        .to_string()
                        .into_bytes(),
                ),
            },
            "invalid JSON for OrderPlaced",
        ),
        // Well-formed, but out of the contract: a negative, zero or huge quantity.
        4 => {
            let quantity = [-5, 0, i64::MIN, i64::MAX, 1_000_001][i / 10 % 5];
            let event = placed(order_id, sku, quantity);
            let (content_type, payload) = if i % 20 == 4 {
                (avro, encode(&event))
            } else {
                (json, encode_json(&event))
            };
            to_inventory(
                Outgoing {
                    topic: orders,
                    key,
                    headers: saga_headers(&message_id, "OrderPlaced", content_type),
                    payload: Some(payload),
                },
                "outside the contract",
            )
        }
        // A reservation whose total is not the sum of its lines, to order-service.
        5 => {
            let event: Event = StockReserved {
                order_id,
                reservation_id: Uuid::new_v4(),
                lines: vec![ReservedLine {
                    sku: sku.to_owned(),
                    quantity: 2,
                    unit_price_cents: 100,
                }],
                total_cents: -200,
                reserved_at: T0,
            }
            .into();
            Hostile {
                record: Outgoing {
                    topic: inventory,
                    key,
                    headers: saga_headers(&message_id, "StockReserved", avro),
                    payload: Some(encode(&event)),
                },
                dlq: "order-service.dlq",
                reason: "outside the contract",
                stub: false,
            }
        }
        // A huge message id that is not a UUID (it would be echoed into the reason).
        6 => {
            let headers = saga_headers(&"x".repeat(4_000), "OrderPlaced", avro);
            to_inventory(
                Outgoing {
                    topic: orders,
                    key,
                    headers,
                    payload: Some(encode(&placed(order_id, sku, 1))),
                },
                "is not a UUID",
            )
        }
        // Forty headers.
        7 => {
            let mut headers = saga_headers(&message_id, "OrderPlaced", avro);
            for n in 0..40 {
                headers.push((format!("x-junk-{n}"), b"junk".to_vec()));
            }
            to_inventory(
                Outgoing {
                    topic: orders,
                    key,
                    headers,
                    payload: Some(encode(&placed(order_id, sku, 1))),
                },
                "headers; at most 32",
            )
        }
        // A valid cancellation keyed by another order.
        8 => {
            let event: Event = OrderCancelled {
                order_id,
                reason: CancelReason::CustomerRequest,
                cancelled_at: T0,
            }
            .into();
            to_inventory(
                Outgoing {
                    topic: orders,
                    key: Some(Uuid::new_v4().to_string().into_bytes()),
                    headers: saga_headers(&message_id, "OrderCancelled", avro),
                    payload: Some(encode(&event)),
                },
                "is not the event's order id",
            )
        }
        // A payload larger than any saga event.
        _ => to_inventory(
            Outgoing {
                topic: orders,
                key,
                headers: saga_headers(&message_id, "OrderPlaced", avro),
                payload: Some(vec![b'x'; 70 * 1024]),
            },
            "the payload has 71680 bytes",
        ),
    }
}

/// Records too large for the DLQ to hold a full copy of, and one with too many header bytes.
fn oversized() -> Vec<Hostile> {
    let big = |n: usize| Hostile {
        record: Outgoing {
            topic: schemas::ORDERS_TOPIC.to_owned(),
            key: Some(Uuid::new_v4().to_string().into_bytes()),
            headers: saga_headers(&Uuid::new_v4().to_string(), "OrderPlaced", "avro/binary"),
            payload: Some(vec![n as u8; 700 * 1024]),
        },
        dlq: "inventory-service.dlq",
        reason: "this dead letter is a stub",
        stub: true,
    };
    let mut headers = saga_headers(&Uuid::new_v4().to_string(), "OrderPlaced", "avro/binary");
    headers.push(("tracestate".into(), vec![b'a'; 9 * 1024]));
    vec![
        big(1),
        big(2),
        Hostile {
            record: Outgoing {
                topic: schemas::ORDERS_TOPIC.to_owned(),
                key: None,
                headers,
                payload: Some(b"{}".to_vec()),
            },
            dlq: "inventory-service.dlq",
            reason: "the headers have",
            stub: false,
        },
    ]
}

fn place(record: &Delivery) -> Option<(String, i32, i64)> {
    Some((
        record.header("dlq-original-topic")?.to_owned(),
        record.header("dlq-original-partition")?.parse().ok()?,
        record.header("dlq-original-offset")?.parse().ok()?,
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_hostile_records_are_dead_lettered_with_reasons_while_real_orders_complete() {
    let mut stack = Stack::start_with("hostile", StackOptions::default()).await;
    const STOCK: i64 = 1_000;
    const ORDERS: usize = 40;
    stack.put_product("A", 250, STOCK).await;
    let sku = stack.sku("A");
    let seed = rand::random::<u64>();
    eprintln!("hostile records seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut hostile: Vec<Hostile> = (0..1_000).map(|i| hostile(i, &sku, &mut rng)).collect();
    hostile.extend(oversized());

    // Real orders and the hostile records at the same time.
    let records: Vec<Outgoing> = hostile.iter().map(|h| h.record.clone()).collect();
    let bootstrap = stack.broker.bootstrap.clone();
    let produced = tokio::spawn(async move { kafka::produce_many(&bootstrap, &records).await });
    let ids = join_all((0..ORDERS).map(|_| stack.place_order(&[("A", 2)]))).await;
    let produced = produced
        .await
        .unwrap()
        .expect("produce the hostile records");

    stack
        .wait_for_statuses(&ids, &["CONFIRMED"], Duration::from_secs(180))
        .await;

    // Every hostile record is in its group's DLQ, under its own place, with its reason.
    let expected: HashMap<(String, i32, i64), &Hostile> = hostile
        .iter()
        .zip(&produced)
        .map(|(h, (p, o))| ((h.record.topic.clone(), *p, *o), h))
        .collect();
    let letters = eventually(Duration::from_secs(180), || async {
        let mut found = HashMap::new();
        for dlq in ["inventory-service.dlq", "order-service.dlq"] {
            for record in kafka::read_topic(&stack.broker.bootstrap, dlq).await? {
                if let Some(place) = place(&record).filter(|p| expected.contains_key(p)) {
                    found.insert(place, (dlq, record));
                }
            }
        }
        let missing = expected.len() - found.len();
        anyhow::ensure!(
            missing == 0,
            "{missing} hostile records not dead-lettered yet"
        );
        Ok(Some(found))
    })
    .await
    .expect("every hostile record dead-lettered");
    for (place, hostile) in &expected {
        let (dlq, letter) = &letters[place];
        let reason = letter.header("dlq-error-message").unwrap_or_default();
        assert_eq!(*dlq, hostile.dlq, "{place:?}: {reason}");
        assert_eq!(
            letter.header("dlq-error-class"),
            Some("permanent"),
            "{place:?}"
        );
        assert!(
            reason.contains(hostile.reason),
            "{place:?}: expected {:?} in {reason:?}",
            hostile.reason
        );
        assert!(
            reason.len() <= 2_100,
            "{place:?}: a reason of {} bytes",
            reason.len()
        );
        if hostile.stub {
            assert_eq!(letter.header("dlq-stub"), Some("true"), "{place:?}");
            assert!(letter.payload.is_none(), "{place:?}: a stub has no value");
        } else {
            assert_eq!(
                letter.payload.clone().unwrap_or_default(),
                hostile.record.payload.clone().unwrap_or_default(),
                "{place:?}: the dead letter holds the original bytes"
            );
        }
    }

    // Nothing crashed, and the stock moved only for the real orders.
    let exited = stack.exited_or_restarted().await;
    assert!(exited.is_empty(), "exited or restarted: {exited:?}");
    for url in [&stack.order_url, &stack.inventory_url] {
        stack.wait_ready(url).await;
    }
    eventually(Duration::from_secs(60), || async {
        let a = stack.product("A").await;
        let sold = 2 * ORDERS as i64;
        anyhow::ensure!(a["sold"] == sold, "sold {} of {sold}", a["sold"]);
        anyhow::ensure!(
            a["available"] == STOCK - sold && a["reserved"] == 0,
            "stock not conserved: {a}"
        );
        Ok(Some(()))
    })
    .await
    .expect("stock conserved");
}

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    /// `retry-*` headers are the consumer's own bookkeeping on its retry copies. On a subscribed
    /// topic they are forged and ignored: a record claiming to be on attempt 2^64-1, from another
    /// topic, not to run before the year 9999, still gets every retry and is dead-lettered under its
    /// real place. In a retry topic the attempt is the topic's and the wait is at most the topic's
    /// delay: a far-future `retry-not-before` cannot hold the retry consumer (and every record
    /// behind it) for good. No forged value becomes a metric label.
    #[tokio::test(flavor = "multi_thread")]
    async fn forged_retry_headers_neither_skip_retries_nor_hold_the_retry_consumer() {
        e2e::requires_own_stack("starts the services with short retry delays");
        let stack = Stack::start_with(
            "hostile_retry_headers",
            StackOptions {
                retry_delays: Some("300ms,300ms".into()),
                ..StackOptions::default()
            },
        )
        .await;
        // Rejections for orders order-service does not have: "not yet" on every attempt.
        let rejection = |order_id: Uuid, topic: &str, forged: &[(&str, &str)]| {
            let body = json!({"order_id": order_id, "reason": "no tea", "shortages": [], "rejected_at": T0});
            let mut headers = saga_headers(
                &Uuid::new_v4().to_string(),
                "StockReservationRejected",
                "application/json",
            );
            headers.extend(
                forged
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec())),
            );
            Outgoing {
                topic: topic.to_owned(),
                key: Some(order_id.to_string().into_bytes()),
                headers,
                payload: Some(body.to_string().into_bytes()),
            }
        };
        let year_9999 = schemas::limits::MAX_TIME_MILLIS.to_string();
        let forged = [
            ("retry-attempt", "18446744073709551615"),
            ("retry-original-topic", "forged-topic"),
            ("retry-original-partition", "7"),
            ("retry-original-offset", "999999"),
            ("retry-not-before", year_9999.as_str()),
        ];
        // First into the retry topic, so that a consumer sleeping until its retry-not-before would
        // also hold up the other record's first retry behind it.
        let (in_retry, on_main) = (Uuid::new_v4(), Uuid::new_v4());
        let produced = kafka::produce_many(
            &stack.broker.bootstrap,
            &[
                rejection(in_retry, "order-service.retry.1", &forged),
                rejection(on_main, schemas::INVENTORY_TOPIC, &forged),
            ],
        )
        .await
        .unwrap();

        let letters = eventually(Duration::from_secs(90), || async {
            let letters = kafka::read_topic(&stack.broker.bootstrap, "order-service.dlq").await?;
            let of = |id: Uuid| {
                letters
                    .iter()
                    .find(|r| r.key_str() == Some(id.to_string().as_str()))
                    .cloned()
            };
            Ok(of(in_retry).zip(of(on_main)))
        })
        .await
        .expect("both records dead-lettered");
        let (from_retry, from_main) = letters;
        assert_eq!(
            place(&from_main),
            Some((
                schemas::INVENTORY_TOPIC.to_owned(),
                produced[1].0,
                produced[1].1
            )),
            "dead-lettered under its real place"
        );
        assert_eq!(
            (
                from_main.header("dlq-error-class"),
                from_main.header("dlq-attempts")
            ),
            (Some("retryable"), Some("3")),
            "the first attempt and both retries, whatever it claimed"
        );
        assert_eq!(
            from_retry.header("dlq-error-class"),
            Some("retryable"),
            "{:?}",
            from_retry.header("dlq-error-message")
        );
        let metrics = stack.metrics_text(&stack.order_url).await;
        assert!(
            !metrics.contains("forged-topic"),
            "a forged header became a metric label"
        );
    }
}
