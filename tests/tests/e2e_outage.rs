//! A database outage delays work and never dead-letters or drops it (design promise 6).

use std::collections::HashMap;
use std::time::Duration;

use e2e::{Stack, StackOptions, eventually, kafka};
use futures::future::join_all;
use schemas::Event;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(90);

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn an_inventory_database_outage_delays_events_and_loses_or_dead_letters_none() {
        e2e::requires_own_stack("cuts inventory-service's database connections");
        let stack = Stack::start_with(
            "db_outage",
            StackOptions {
                inventory_db_proxy: true,
                ..StackOptions::default()
            },
        )
        .await;
        stack.put_product("A", 100, 1000).await;
        let before = join_all((0..5).map(|_| stack.place_order(&[("A", 1)]))).await;
        stack
            .wait_for_statuses(&before, &["CONFIRMED"], TIMEOUT)
            .await;

        let proxy = stack.inventory_proxy.as_ref().unwrap();
        proxy.take_down();
        let during: Vec<Uuid> = join_all((0..20).map(|_| stack.place_order(&[("A", 2)]))).await;
        // The OrderPlaced events reach inventory-service, which cannot apply them and retries in
        // place; the outage then lasts a few seconds more, over several retries.
        eventually(TIMEOUT, || async {
            let retries = stack
                .metric(
                    &stack.inventory_url,
                    "consumer_transient_retries_total",
                    &[],
                )
                .await;
            Ok((retries > 0.0).then_some(()))
        })
        .await
        .expect("the consumer meets the outage");
        tokio::time::sleep(Duration::from_secs(4)).await;
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM order_status_view WHERE order_id = ANY($1) AND status = 'PENDING'",
        )
        .bind(&during)
        .fetch_one(&stack.orders_pool().await)
        .await
        .unwrap();
        assert_eq!(
            pending, 20,
            "nothing can be reserved while the database is down"
        );

        proxy.bring_up();
        stack
            .wait_for_statuses(&during, &["CONFIRMED"], TIMEOUT)
            .await;

        // Nothing was dead-lettered, and every event was applied exactly once.
        let dlq = kafka::read_topic(&stack.broker.bootstrap, "inventory-service.dlq")
            .await
            .unwrap();
        assert!(dlq.is_empty(), "{} records were dead-lettered", dlq.len());
        eventually(TIMEOUT, || async {
            let a = stack.product("A").await;
            Ok((a["sold"] == 5 + 2 * 20).then_some(()))
        })
        .await
        .expect("all stock sold");
        stack.assert_stock_conserved(&[("A", 1000)]).await;
        let records = kafka::read_topic(&stack.broker.bootstrap, schemas::INVENTORY_TOPIC)
            .await
            .unwrap();
        let mut reserved: HashMap<Uuid, std::collections::HashSet<String>> = HashMap::new();
        for r in &records {
            if let Ok(Event::StockReserved(s)) = r.event() {
                reserved
                    .entry(s.order_id)
                    .or_default()
                    .insert(r.header("message-id").unwrap().to_owned());
            }
        }
        for id in before.iter().chain(&during) {
            assert_eq!(
                reserved.get(id).map(|m| m.len()),
                Some(1),
                "StockReserved of {id}"
            );
        }
    }
}
