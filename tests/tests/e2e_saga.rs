//! The saga end to end: orders placed over HTTP are confirmed or rejected by the inventory through
//! Kafka, with stock conserved and one terminal event per order.

use std::collections::HashMap;
use std::time::Duration;

use e2e::kafka::{self, Delivery};
use e2e::{Stack, eventually};
use futures::future::join_all;
use schemas::{Event, limits};
use serde_json::json;
use uuid::Uuid;

const SAGA_TIMEOUT: Duration = Duration::from_secs(90);

/// The records of `topic` about the orders `ids`, once each of them has an event matching `pick`.
async fn wait_for_events(
    stack: &Stack,
    topic: &str,
    ids: &[Uuid],
    pick: fn(&Event) -> bool,
) -> Vec<(Delivery, Event)> {
    eventually(SAGA_TIMEOUT, || async {
        let records = kafka::read_topic(&stack.broker.bootstrap, topic).await?;
        let keyed_by_ours = |r: &Delivery| {
            let key = r.key_str().and_then(|k| Uuid::parse_str(k).ok());
            key.is_some_and(|k| ids.contains(&k))
        };
        let mut decoded: Vec<(Delivery, Event)> = Vec::new();
        for r in records {
            match r.event() {
                Ok(e) if ids.contains(&e.order_id()) => decoded.push((r, e)),
                Ok(_) => {}
                // A record of this test's orders must decode; another test's poison record on
                // a shared stack is not this test's business.
                Err(e) if keyed_by_ours(&r) => return Err(e.into()),
                Err(_) => {}
            }
        }
        let seen = decoded.iter().filter(|(_, e)| pick(e)).count();
        Ok((seen >= ids.len()).then_some(decoded))
    })
    .await
    .expect("events on the topic")
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_orders_against_limited_stock_confirm_exactly_what_stock_allows() {
    let stack = Stack::start("fifty_concurrent_orders").await;
    // Each order wants 2 x A and 1 x B: A allows 15 orders, B would allow 20.
    stack.put_product("A", 250, 30).await;
    stack.put_product("B", 100, 20).await;

    let ids: Vec<Uuid> = join_all((0..50).map(|_| stack.place_order(&[("A", 2), ("B", 1)]))).await;
    let statuses = stack
        .wait_for_statuses(&ids, &["CONFIRMED", "REJECTED"], SAGA_TIMEOUT)
        .await;

    let confirmed: Vec<Uuid> = ids
        .iter()
        .copied()
        .filter(|id| statuses[id] == "CONFIRMED")
        .collect();
    assert_eq!(confirmed.len(), 15, "A's stock allows exactly 15 orders");
    for id in &ids {
        let order = stack.order(*id).await;
        let payments = stack
            .get_json(&format!("{}/payments?order_id={id}", stack.payment_url))
            .await;
        if statuses[id] == "CONFIRMED" {
            assert_eq!(order["total_cents"], 2 * 250 + 100, "{order}");
            // Paid its total, once: one payment, CONFIRMED, and one charge at the processor.
            assert_eq!(payments.as_array().map(Vec::len), Some(1), "{payments}");
            assert_eq!(
                (
                    payments[0]["status"].as_str(),
                    payments[0]["amount_cents"].as_i64()
                ),
                (Some("CONFIRMED"), Some(2 * 250 + 100)),
                "{payments}"
            );
            let payment_id = payments[0]["payment_id"].as_str().unwrap();
            assert_eq!(
                stack.ledger_of(payment_id).await,
                (2 * 250 + 100, 1),
                "one charge of the total at the processor"
            );
        } else {
            assert_eq!(
                payments,
                serde_json::json!([]),
                "a rejected order asks for no payment"
            );
            let reason = order["reason"].as_str().unwrap_or_default();
            let expected = format!("insufficient stock for sku {}", stack.sku("A"));
            assert!(reason.contains(&expected), "{order}");
        }
        let history: Vec<&str> = order["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["status"].as_str().unwrap())
            .collect();
        let expected: &[&str] = match statuses[id].as_str() {
            "CONFIRMED" => &["PENDING", "AWAITING_PAYMENT", "CONFIRMED"],
            other => &["PENDING", other],
        };
        assert_eq!(history, expected);
    }

    // Confirmed orders' stock ends sold (OrderConfirmed reached the inventory); nothing is lost.
    eventually(SAGA_TIMEOUT, || async {
        let a = stack.product("A").await;
        Ok((a["sold"] == 30).then_some(()))
    })
    .await
    .expect("A sold out");
    stack.assert_stock_conserved(&[("A", 30), ("B", 20)]).await;
    let b = stack.product("B").await;
    assert_eq!(
        (
            b["available"].as_i64(),
            b["reserved"].as_i64(),
            b["sold"].as_i64()
        ),
        (Some(5), Some(0), Some(15))
    );

    // Exactly one terminal event per order on orders.v1, keyed and headed as the contract says.
    let events = wait_for_events(&stack, schemas::ORDERS_TOPIC, &ids, |e| {
        matches!(e, Event::OrderConfirmed(_) | Event::OrderRejected(_))
    })
    .await;
    let mut terminal: HashMap<Uuid, Vec<&str>> = HashMap::new();
    for (record, event) in &events {
        let order_id = event.order_id();
        assert_eq!(record.key_str(), Some(order_id.to_string().as_str()));
        assert_eq!(
            record.header("correlation-id"),
            Some(order_id.to_string().as_str())
        );
        assert_eq!(record.header("event-type"), Some(event.event_type()));
        assert_eq!(
            record.header("content-type"),
            Some(schemas::AVRO_CONTENT_TYPE)
        );
        assert!(
            record
                .header("message-id")
                .is_some_and(|m| m.parse::<Uuid>().is_ok())
        );
        assert!(record.header("traceparent").is_some());
        match event {
            Event::OrderPlaced(_) => assert!(record.header("causation-id").is_none()),
            _ => assert!(record.header("causation-id").is_some()),
        }
        if matches!(event, Event::OrderConfirmed(_) | Event::OrderRejected(_)) {
            terminal
                .entry(order_id)
                .or_default()
                .push(event.event_type());
        }
    }
    for id in &ids {
        let expected = if statuses[id] == "CONFIRMED" {
            "OrderConfirmed"
        } else {
            "OrderRejected"
        };
        assert_eq!(terminal[id], [expected], "terminal events of {id}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_for_an_unknown_sku_is_rejected_naming_the_sku() {
    let stack = Stack::start("unknown_sku").await;
    stack.put_product("A", 100, 5).await;
    let id = stack.place_order(&[("A", 1), ("NOPE-1", 2)]).await;
    stack
        .wait_for_statuses(&[id], &["REJECTED"], SAGA_TIMEOUT)
        .await;
    let order = stack.order(id).await;
    assert_eq!(
        order["reason"],
        format!("unknown sku {}", stack.sku("NOPE-1"))
    );
    // Nothing was reserved for the known line either: all or none.
    stack.assert_stock_conserved(&[("A", 5)]).await;
    assert_eq!(stack.product("A").await["available"], 5);
    let reservations = stack
        .get_json(&format!(
            "{}/reservations?order_id={id}",
            stack.inventory_url
        ))
        .await;
    assert_eq!(reservations.as_array().map(Vec::len), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_event_with_the_same_message_id_has_no_second_effect() {
    let stack = Stack::start("redelivery").await;
    stack.put_product("A", 100, 10).await;
    let id = stack.place_order(&[("A", 3)]).await;
    stack
        .wait_for_statuses(&[id], &["CONFIRMED"], SAGA_TIMEOUT)
        .await;
    // The saga settles first (inventory applied OrderConfirmed: sold), so that what follows
    // measures the duplicate alone.
    eventually(SAGA_TIMEOUT, || async {
        Ok((stack.product("A").await["sold"] == 3).then_some(()))
    })
    .await
    .expect("the confirmed order's stock is sold");
    let placed = wait_for_events(&stack, schemas::ORDERS_TOPIC, &[id], |e| {
        matches!(e, Event::OrderPlaced(_))
    })
    .await
    .into_iter()
    .find(|(_, e)| matches!(e, Event::OrderPlaced(p) if p.order_id == id))
    .map(|(r, _)| r)
    .unwrap();

    // The same record again: same key, same headers (so the same message-id), same bytes.
    kafka::produce_many(
        &stack.broker.bootstrap,
        &[kafka::Outgoing::copy_of(&placed)],
    )
    .await
    .unwrap();

    let duplicates = eventually(SAGA_TIMEOUT, || async {
        let n = stack
            .metric(
                &stack.inventory_url,
                "consumer_messages_duplicate_total",
                &[("event_type", "OrderPlaced")],
            )
            .await;
        Ok((n >= 1.0).then_some(n))
    })
    .await
    .expect("the duplicate is counted");
    assert_eq!(duplicates, 1.0);

    // No second reservation, no second StockReserved, stock moved once.
    let reservations = stack
        .get_json(&format!(
            "{}/reservations?order_id={id}",
            stack.inventory_url
        ))
        .await;
    assert_eq!(reservations.as_array().map(Vec::len), Some(1));
    let a = stack.product("A").await;
    assert_eq!(
        (
            a["available"].as_i64(),
            a["reserved"].as_i64(),
            a["sold"].as_i64()
        ),
        (Some(7), Some(0), Some(3)),
        "{a}"
    );
    let inventory_events = kafka::read_topic(&stack.broker.bootstrap, schemas::INVENTORY_TOPIC)
        .await
        .unwrap();
    let reserved = inventory_events
        .iter()
        .filter(|r| matches!(r.event(), Ok(Event::StockReserved(s)) if s.order_id == id))
        .count();
    assert_eq!(reserved, 1);
}

/// Each group applies the events it acts on (an inbox row each) and passes the others on its
/// topic by, counted, with no inbox row: payment-service takes OrderAwaitingPayment and passes
/// OrderPlaced and OrderConfirmed by; inventory-service the other way round.
#[tokio::test(flavor = "multi_thread")]
async fn each_group_applies_the_events_it_acts_on_and_passes_the_others_by() {
    let stack = Stack::start("passed_by").await;
    let sku = stack.sku("A");
    stack.put_product(&sku, 100, 10).await;
    let id = stack.place_order(&[(&sku, 1)]).await;
    stack
        .wait_for_statuses(&[id], &["CONFIRMED"], SAGA_TIMEOUT)
        .await;
    eventually(SAGA_TIMEOUT, || async {
        Ok((stack.product(&sku).await["sold"] == 1).then_some(()))
    })
    .await
    .expect("the confirmed order's stock is sold");
    let records = wait_for_events(&stack, schemas::ORDERS_TOPIC, &[id], |e| {
        matches!(e, Event::OrderConfirmed(_))
    })
    .await;
    let id_of = |event_type: &str| {
        records
            .iter()
            .find(|(_, e)| e.event_type() == event_type)
            .and_then(|(r, _)| r.header("message-id")?.parse::<Uuid>().ok())
            .unwrap_or_else(|| panic!("no {event_type} of the order on orders.v1"))
    };
    let all = ["OrderPlaced", "OrderAwaitingPayment", "OrderConfirmed"].map(id_of);
    let inboxed = |pool: sqlx::PgPool, group: &'static str| async move {
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT message_id FROM inbox WHERE consumer_group = $1 AND message_id = ANY($2) \
             ORDER BY processed_at",
        )
        .bind(group)
        .bind(&all[..])
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        ids
    };
    assert_eq!(
        inboxed(stack.payments_pool().await, schemas::PAYMENT_SERVICE).await,
        vec![all[1]],
        "payment-service applied OrderAwaitingPayment alone"
    );
    assert_eq!(
        inboxed(stack.inventory_pool().await, schemas::INVENTORY_SERVICE).await,
        vec![all[0], all[2]],
        "inventory-service applied OrderPlaced and OrderConfirmed"
    );
    for (url, event_type) in [
        (&stack.payment_url, "OrderPlaced"),
        (&stack.payment_url, "OrderConfirmed"),
        (&stack.inventory_url, "OrderAwaitingPayment"),
    ] {
        let passed = stack
            .metric(
                url,
                "consumer_messages_ignored_total",
                &[("event_type", event_type)],
            )
            .await;
        assert!(passed >= 1.0, "{url} counted no {event_type} passed by");
    }
}

/// Money and quantities have upper bounds in the contract that no sum can overflow. A price
/// beyond the bound is refused with 422 and nothing is stored; an order at every bound at once
/// (100 lines of 1,000,000 units at the largest price) is reserved with its exact total, 10^18
/// cents, where the unchecked arithmetic of old wrapped or panicked, and its payment is asked for
/// exactly that. The processor declines it (above its limit): the order ends CANCELLED for
/// PAYMENT_DECLINED, nothing was charged, and every unit is available again.
#[tokio::test(flavor = "multi_thread")]
async fn prices_beyond_the_bound_are_refused_and_an_order_at_every_bound_is_asked_its_exact_total()
{
    let stack = Stack::start("saga_bounds").await;
    let url = format!("{}/products/{}", stack.inventory_url, stack.sku("HUGE"));
    for (price, available) in [(i64::MAX, 10), (limits::MAX_PRICE_CENTS + 1, 10), (1, -1)] {
        let r = stack
            .http
            .put(&url)
            .json(&json!({"name": "huge", "price_cents": price, "available": available}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "price {price}, available {available}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "price {price}"
        );
    }
    let r = stack.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 404, "nothing was stored");

    let units = limits::MAX_QUANTITY * limits::MAX_ITEMS as i64;
    stack
        .put_product("HUGE", limits::MAX_PRICE_CENTS, units)
        .await;
    let lines: Vec<_> = (0..limits::MAX_ITEMS)
        .map(|_| ("HUGE", limits::MAX_QUANTITY))
        .collect();
    let id = stack.place_order(&lines).await;
    stack
        .wait_for_statuses(&[id], &["CANCELLED"], Duration::from_secs(60))
        .await;
    let order = stack.order(id).await;
    assert_eq!(order["total_cents"], limits::MAX_TOTAL_CENTS, "{order}");
    assert_eq!(limits::MAX_TOTAL_CENTS, 1_000_000_000_000_000_000);
    assert!(
        order["reason"]
            .as_str()
            .is_some_and(|r| r.contains("PAYMENT_DECLINED")),
        "{order}"
    );
    let payment = stack.payment_of(id).await;
    assert_eq!(
        payment["amount_cents"],
        limits::MAX_TOTAL_CENTS,
        "{payment}"
    );
    assert_eq!(
        (payment["status"].as_str(), payment["decline_code"].as_str()),
        (Some("DECLINED"), Some("over_limit")),
        "{payment}"
    );
    eventually(SAGA_TIMEOUT, || async {
        let product = stack.product("HUGE").await;
        Ok((product["available"] == units).then_some(product))
    })
    .await
    .map(|product| {
        assert_eq!(
            (&product["reserved"], &product["sold"]),
            (&json!(0), &json!(0)),
            "{product}"
        )
    })
    .expect("the declined order's stock is available again");
}
