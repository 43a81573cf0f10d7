//! The relay's promises: no committed outbox row is ever lost, whether the relay is killed in the
//! middle of a batch or a row commits after later rows were already published.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use e2e::{Process, Stack, StackOptions, eventually, kafka};
use futures::StreamExt;
use messaging::outbox::Cause;
use order_service::store::{self, Item, NewOrder};
use schemas::Event;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread")]
async fn a_row_that_commits_after_later_rows_were_published_is_still_published() {
    let stack = Stack::start("late_commit").await;
    stack.put_product("A", 100, 100).await;
    let orders_db = stack.orders_pool().await;

    // A transaction takes an outbox id and holds it, uncommitted.
    let mut late = orders_db.begin().await.unwrap();
    let order = NewOrder {
        customer_id: Uuid::new_v4(),
        items: vec![Item {
            sku: stack.sku("A"),
            quantity: 1,
        }],
    };
    let late_view = store::insert_order(
        &mut late,
        &order,
        &order_service::transition::Steps::default(),
        &Cause::default(),
    )
    .await
    .unwrap();
    let late_row: i64 = sqlx::query_scalar("SELECT id FROM outbox WHERE aggregate_id = $1")
        .bind(late_view.order_id.to_string())
        .fetch_one(&mut *late)
        .await
        .unwrap();

    // Later rows commit, are published, and their sagas finish.
    let mut later = Vec::new();
    for _ in 0..3 {
        later.push(stack.place_order(&[("A", 1)]).await);
    }
    stack
        .wait_for_statuses(&later, &["CONFIRMED"], TIMEOUT)
        .await;
    // Every later row (OrderPlaced, then OrderConfirmed) is published and removed while the
    // late one is still uncommitted.
    eventually(TIMEOUT, || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE id > $1")
            .bind(late_row)
            .fetch_one(&orders_db)
            .await?;
        Ok((left == 0).then_some(()))
    })
    .await
    .expect("later rows were published and removed");

    late.commit().await.unwrap();
    stack
        .wait_for_statuses(&[late_view.order_id], &["CONFIRMED"], TIMEOUT)
        .await;
    let records = kafka::read_topic(&stack.broker.bootstrap, schemas::ORDERS_TOPIC)
        .await
        .unwrap();
    let placed_late = records
        .iter()
        .filter(
            |r| matches!(r.event(), Ok(Event::OrderPlaced(p)) if p.order_id == late_view.order_id),
        )
        .count();
    assert_eq!(placed_late, 1);
}

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn killing_the_relay_mid_publish_loses_no_row_and_applies_each_once() {
        e2e::requires_own_stack("kills the relay mid-publish");
        const ORDERS: usize = 3000;
        let mut stack = Stack::start_with(
            "relay_kill9",
            StackOptions {
                relay: false,
                relay_batch_size: 50,
                ..StackOptions::default()
            },
        )
        .await;
        stack.put_product("A", 150, 100_000).await;

        // Orders placed while no relay runs pile up in the outbox; the relay is started on them
        // and killed (-9) once it has published some. The kill must land while rows it
        // published are still in the outbox (published, not yet deleted): those are the rows
        // the next relay publishes again. A machine fast enough to finish first gets another
        // backlog and another kill.
        let orders_db = stack.orders_pool().await;
        let mut ids: Vec<Uuid> = Vec::new();
        let mut committed: HashSet<Uuid> = HashSet::new();
        let mut republished = 0;
        for attempt in 1..=5 {
            let placed: Vec<Uuid> = futures::stream::iter(0..ORDERS)
                .map(|_| stack.place_order(&[("A", 2)]))
                .buffer_unordered(16)
                .collect()
                .await;
            ids.extend(placed);
            let backlog: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(&orders_db)
                .await
                .unwrap();
            // The OrderPlaced rows (the outbox holds OrderConfirmed rows too after a first kill).
            let placed: Vec<Uuid> = sqlx::query_scalar(
                "SELECT message_id FROM outbox WHERE event_type = 'OrderPlaced'",
            )
            .fetch_all(&orders_db)
            .await
            .unwrap();
            committed.extend(placed);
            stack.start_process(Process::Relay).await;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                    .fetch_one(&orders_db)
                    .await
                    .unwrap();
                if left < backlog - 100 {
                    break;
                }
                assert!(Instant::now() < deadline, "the relay published nothing");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            stack.kill(Process::Relay);
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(&orders_db)
                .await
                .unwrap();
            (republished, _) = stack.published_outbox_rows().await;
            println!(
                "kill {attempt}: relay killed with {left} of {backlog} rows still in the outbox, \
                 {republished} of them already published"
            );
            if left > 0 && republished > 0 {
                break;
            }
        }
        assert!(
            republished > 0,
            "no kill landed while published rows were still in the outbox"
        );
        stack.start_process(Process::Relay).await;
        let statuses = stack.wait_for_statuses(&ids, &["CONFIRMED"], TIMEOUT).await;
        assert_eq!(committed.len(), ids.len(), "one OrderPlaced per order");
        assert_eq!(statuses.len(), ids.len());

        // Every committed row reached Kafka (duplicates allowed).
        let records = kafka::read_topic(&stack.broker.bootstrap, schemas::ORDERS_TOPIC)
            .await
            .unwrap();
        let published: HashSet<Uuid> = records
            .iter()
            .filter_map(|r| r.header("message-id")?.parse().ok())
            .collect();
        let missing: Vec<_> = committed.difference(&published).collect();
        assert!(missing.is_empty(), "{} rows never published", missing.len());

        // The consumers' state is as if no crash: one reservation and one StockReserved per order,
        // all stock sold exactly once.
        eventually(TIMEOUT, || async {
            let a = stack.product("A").await;
            Ok((a["sold"] == 2 * ids.len() as i64).then_some(()))
        })
        .await
        .expect("every confirmed order's stock sold");
        stack.assert_stock_conserved(&[("A", 100_000)]).await;
        let inventory_db = stack.inventory_pool().await;
        let reservations: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations")
            .fetch_one(&inventory_db)
            .await
            .unwrap();
        assert_eq!(reservations, ids.len() as i64);
        let inventory_records =
            kafka::read_topic(&stack.broker.bootstrap, schemas::INVENTORY_TOPIC)
                .await
                .unwrap();
        let mut reserved_per_order: HashMap<Uuid, usize> = HashMap::new();
        let mut reserved_ids = HashSet::new();
        for r in &inventory_records {
            if let Ok(Event::StockReserved(s)) = r.event() {
                // Count distinct messages: a republished row has the same message id.
                if reserved_ids.insert(r.header("message-id").unwrap().to_owned()) {
                    *reserved_per_order.entry(s.order_id).or_default() += 1;
                }
            }
        }
        assert_eq!(reserved_per_order.len(), ids.len());
        assert!(reserved_per_order.values().all(|n| *n == 1));
        // The rows the killed relay had published and not deleted were published again, and
        // inventory-service's inbox skipped each second copy.
        let duplicates = eventually(TIMEOUT, || async {
            let skipped = stack
                .metric(
                    &stack.inventory_url,
                    "consumer_messages_duplicate_total",
                    &[("topic", schemas::ORDERS_TOPIC)],
                )
                .await;
            anyhow::ensure!(
                skipped >= republished as f64,
                "{republished} rows were published again but inventory-service skipped only \
                 {skipped} duplicates"
            );
            Ok(Some(skipped))
        })
        .await
        .unwrap();
        println!(
            "duplicates skipped by inventory-service after the crash: {duplicates} \
             ({republished} rows published twice)"
        );
    }

    /// The relay reads ahead while earlier rows are being acknowledged. Here it always has a backlog
    /// to read ahead on, while 40 orders each write 15 rows one transaction after another, many of
    /// which hold their outbox id uncommitted for a while (so rows of higher ids commit first): on
    /// the topic, every order's rows come first in commit order, and none is missing.
    #[tokio::test(flavor = "multi_thread")]
    async fn reading_ahead_under_late_commits_keeps_every_order_in_commit_order() {
        e2e::requires_own_stack("writes outbox rows by hand");
        const ORDERS: usize = 40;
        const ROWS_PER_ORDER: usize = 15;
        let stack = Stack::start_with(
            "relay_read_ahead",
            StackOptions {
                inventory: false,
                relay_batch_size: 200,
                ..StackOptions::default()
            },
        )
        .await;
        let orders_db = stack.orders_pool().await;
        let insert = "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, \
                      content_type, payload) VALUES ($1, 'order', $2, 'OrderPlaced', 'avro/binary', '\\x00')";
        // A backlog of other rows, refilled until the orders are written.
        let filling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let filler = {
            let (db, filling) = (orders_db.clone(), filling.clone());
            tokio::spawn(async move {
                while filling.load(std::sync::atomic::Ordering::Relaxed) {
                    sqlx::query(
                        "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, \
                         content_type, payload) SELECT gen_random_uuid(), 'order', \
                         gen_random_uuid()::text, 'OrderPlaced', 'avro/binary', '\\x00' \
                         FROM generate_series(1, 300)",
                    )
                    .execute(&db)
                    .await
                    .expect("filler rows");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let writers: Vec<_> = (0..ORDERS)
            .map(|_| {
                let db = orders_db.clone();
                tokio::spawn(async move {
                    let order = Uuid::new_v4().to_string();
                    let mut written = Vec::new();
                    for n in 0..ROWS_PER_ORDER {
                        let message_id = Uuid::new_v4();
                        let mut tx = db.begin().await.expect("begin");
                        sqlx::query(insert)
                            .bind(message_id)
                            .bind(&order)
                            .execute(&mut *tx)
                            .await
                            .expect("insert");
                        // Half the rows commit late: ids taken after this one commit first.
                        if rand::random_bool(0.5) {
                            tokio::time::sleep(Duration::from_millis(rand::random_range(1..60)))
                                .await;
                        }
                        tx.commit().await.expect("commit");
                        written.push((n, message_id));
                    }
                    (order, written)
                })
            })
            .collect();
        let mut expected: HashMap<String, Vec<Uuid>> = HashMap::new();
        for writer in writers {
            let (order, written) = writer.await.unwrap();
            expected.insert(order, written.into_iter().map(|(_, id)| id).collect());
        }
        filling.store(false, std::sync::atomic::Ordering::Relaxed);
        filler.await.unwrap();
        stack.wait_for_empty_outbox(&orders_db, TIMEOUT).await;
        let batches = stack
            .metric(&stack.relay_metrics_url, "relay_batch_size_count", &[])
            .await;
        assert!(
            batches >= 20.0,
            "the relay read {batches} times: no read-ahead happened"
        );

        let records = kafka::read_topic(&stack.broker.bootstrap, schemas::ORDERS_TOPIC)
            .await
            .unwrap();
        let mut seen: HashMap<String, Vec<Uuid>> = HashMap::new();
        let mut sorted = records.iter().collect::<Vec<_>>();
        sorted.sort_by_key(|r| (r.partition, r.offset));
        for record in sorted {
            let Some(key) = record.key_str().filter(|k| expected.contains_key(*k)) else {
                continue;
            };
            let id: Uuid = record.header("message-id").unwrap().parse().unwrap();
            let ids = seen.entry(key.to_owned()).or_default();
            // Duplicates may follow (at least once); first copies must come in commit order.
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        for (order, ids) in &expected {
            assert_eq!(
                seen.get(order),
                Some(ids),
                "order {order}: its rows on the topic (first copies, in offset order) differ from its commit order"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn outbox_rows_without_a_topic_are_left_aside_and_do_not_stall_the_source() {
        e2e::requires_own_stack("writes unpublishable rows into the outbox");
        // Reads of at most 100 rows: the 600 rows below would fill six of them.
        let stack = Stack::start_with(
            "relay_unknown_aggregate",
            StackOptions {
                relay_batch_size: 100,
                ..StackOptions::default()
            },
        )
        .await;
        stack.put_product("A", 100, 10).await;
        // More rows of an aggregate type the relay has no topic for than one read holds, ahead
        // of every real row.
        let orders_db = stack.orders_pool().await;
        sqlx::query(
            "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, content_type, payload) \
             SELECT gen_random_uuid(), 'shipment', gen_random_uuid()::text, 'ShipmentBooked', \
             'application/json', '{}'::bytea FROM generate_series(1, 600)",
        )
        .execute(&orders_db)
        .await
        .unwrap();
        let id = stack.place_order(&[("A", 1)]).await;
        stack
            .wait_for_statuses(&[id], &["CONFIRMED"], TIMEOUT)
            .await;
        let left = eventually(TIMEOUT, || async {
            let n = stack
                .metric(
                    &stack.relay_metrics_url,
                    "relay_outbox_unpublishable_rows",
                    &[("source", "orders")],
                )
                .await;
            Ok((n == 600.0).then_some(n))
        })
        .await
        .expect("the relay reports the rows it cannot publish");
        assert_eq!(left, 600.0);
        let still_there: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE aggregate_type = 'shipment'")
                .fetch_one(&orders_db)
                .await
                .unwrap();
        assert_eq!(still_there, 600, "left in place, not deleted");
    }

    /// The publishing relay's leader session dies (its backend terminated, as a failover, a cut
    /// connection or an operator would) while a standby waits: afterwards exactly one relay
    /// publishes. Before the fix the first relay went on publishing from its other connection while
    /// the standby took the released lock, and every row reached the topic twice.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_relay_whose_leader_session_dies_stops_publishing_before_a_standby_starts() {
        e2e::requires_own_stack("starts a second relay and terminates the first one's session");
        let stack = Stack::start("relay_leader_session").await;
        stack.put_product("A", 150, 100_000).await;
        let first = stack.place_order(&[("A", 1)]).await;
        stack
            .wait_for_statuses(&[first], &["CONFIRMED"], TIMEOUT)
            .await;
        let (_standby, listener) = stack
            .spawn_instance(Process::Relay, "outbox-relay-standby")
            .await;
        let urls = [stack.relay_metrics_url.clone(), e2e::url_of(&listener)];

        let orders_db = stack.orders_pool().await;
        let lock_holders = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
        let holder: i32 = sqlx::query_scalar(lock_holders)
            .fetch_one(&orders_db)
            .await
            .expect("the leader's lock");
        let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(holder)
            .fetch_one(&orders_db)
            .await
            .expect("terminating the leader's session");
        assert!(terminated);
        // Some relay holds the lock again (the standby, or the first one after it reconnected).
        eventually(TIMEOUT, || async {
            let holders: Vec<i32> = sqlx::query_scalar(lock_holders)
                .fetch_all(&orders_db)
                .await?;
            Ok((holders.len() == 1 && holders[0] != holder).then_some(()))
        })
        .await
        .expect("a new leader");

        let published = |url: String| {
            let stack = &stack;
            async move {
                stack
                    .metric(&url, "relay_rows_published_total", &[("source", "orders")])
                    .await
            }
        };
        let before = [
            published(urls[0].clone()).await,
            published(urls[1].clone()).await,
        ];
        const ORDERS: usize = 30;
        let mut ids = Vec::new();
        for _ in 0..ORDERS {
            ids.push(stack.place_order(&[("A", 1)]).await);
        }
        stack.wait_for_statuses(&ids, &["CONFIRMED"], TIMEOUT).await;
        // The last OrderConfirmed rows commit with their orders' status and are published just
        // after: wait until the outbox is empty (a row is counted when acknowledged, deleted
        // after).
        stack.wait_for_empty_outbox(&orders_db, TIMEOUT).await;
        let after = [
            published(urls[0].clone()).await,
            published(urls[1].clone()).await,
        ];
        let increases = [after[0] - before[0], after[1] - before[1]];
        // Each order's OrderPlaced, OrderAwaitingPayment and OrderConfirmed: 3 rows per order,
        // published once.
        assert_eq!(
            increases.iter().sum::<f64>(),
            (3 * ORDERS) as f64,
            "rows of the orders source published by the first relay and by the standby: {increases:?}; {}",
            stack.where_logs_are()
        );
        assert!(
            increases.contains(&0.0),
            "both relays published: {increases:?}; {}",
            stack.where_logs_are()
        );
    }
}
