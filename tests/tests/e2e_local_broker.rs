//! The local broker's two faults (README, "The local broker"), and what the system does about them:
//! - Tansu 0.6.0's memory storage answered a fetch from an offset inside a multi-record batch with
//!   the next batch; patched (scripts/tansu/tansu-storage/0002-*), a consumer resuming inside a
//!   batch misses nothing. Against a broker that still skips (the patch's fault switch), the skip
//!   is counted in `consumer_offset_gaps_total` and logged with the missing range.
//! - Tansu can leave partitions assigned to a dead member: the consumers' ownership watchdog gives
//!   them a live reader.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use e2e::{Process, Stack, StackOptions, eventually, kafka, wire};
use futures::StreamExt;
use uuid::Uuid;

const GROUP: &str = "inventory-service";
const TIMEOUT: Duration = Duration::from_secs(120);

/// Places `n` orders for a sku inventory does not know (each is rejected: no stock needed).
async fn place_orders(stack: &Stack, n: usize) -> Vec<Uuid> {
    futures::stream::iter(0..n)
        .map(|_| stack.place_order(&[("NO-SUCH-SKU", 1)]))
        .buffer_unordered(8)
        .collect()
        .await
}

/// Places 30 orders while neither the relay nor inventory-service runs, lets the relay publish
/// them at once (in multi-record batches), checks that offset 1 is inside a batch on some
/// partition, moves the inventory group's committed offset of every partition to 1, and starts
/// inventory-service. Returns the stack and the records of `orders.v1` from offset 1 on.
async fn resume_inside_a_batch(
    test: &str,
    broker_skips_mid_batch: bool,
) -> (Stack, Vec<kafka::Delivery>) {
    let mut stack = Stack::start_with(
        test,
        StackOptions {
            relay: false,
            inventory: false,
            broker_skips_mid_batch,
            ..StackOptions::default()
        },
    )
    .await;
    let first = place_orders(&stack, 30).await;
    stack.start_process(Process::Relay).await;
    let bootstrap = stack.broker.bootstrap.clone();
    let records = eventually(TIMEOUT, || async {
        let records = kafka::read_topic(&bootstrap, schemas::ORDERS_TOPIC).await?;
        Ok((records.len() >= first.len()).then_some(records))
    })
    .await
    .expect("the relay published the orders");
    let mut partitions: Vec<i32> = records.iter().map(|r| r.partition).collect();
    partitions.sort_unstable();
    partitions.dedup();
    let mut wire = wire::Connection::connect(&bootstrap)
        .await
        .expect("connect");
    let mut inside = Vec::new();
    for partition in &partitions {
        let fetched = wire
            .fetch(schemas::ORDERS_TOPIC, *partition, 0, 1_000)
            .await
            .expect("fetch");
        let batches = fetched.batches().expect("batches");
        if batches
            .first()
            .is_some_and(|b| b.base_offset == 0 && b.holds(1))
        {
            inside.push(*partition);
        }
    }
    assert!(
        !inside.is_empty(),
        "the relay published no multi-record batch at offset 0 of any partition: offset 1 is \
         inside no batch, and the test would prove nothing"
    );
    let offsets: Vec<(i32, i64)> = partitions.iter().map(|p| (*p, 1)).collect();
    kafka::commit_offsets(&bootstrap, GROUP, schemas::ORDERS_TOPIC, &offsets)
        .await
        .expect("commit offsets");
    stack.start_process(Process::InventoryService).await;
    // New records behind the first batches, on every partition, one by one.
    for _ in 0..12 {
        place_orders(&stack, 1).await;
    }
    let records = eventually(TIMEOUT, || async {
        let records = kafka::read_topic(&bootstrap, schemas::ORDERS_TOPIC).await?;
        Ok((records.len() >= first.len() + 12).then_some(records))
    })
    .await
    .expect("the later orders were published");
    let from_one = records.into_iter().filter(|r| r.offset >= 1).collect();
    (stack, from_one)
}

/// The message ids of `records` that the inventory group has applied.
async fn applied(stack: &Stack, records: &[kafka::Delivery]) -> HashSet<Uuid> {
    let ids: Vec<Uuid> = records
        .iter()
        .filter_map(|r| r.header("message-id")?.parse().ok())
        .collect();
    let pool = stack.inventory_pool().await;
    let rows: Vec<Uuid> = sqlx::query_scalar(
        "SELECT message_id FROM inbox WHERE consumer_group = $1 AND message_id = ANY($2)",
    )
    .bind(GROUP)
    .bind(&ids)
    .fetch_all(&pool)
    .await
    .expect("inbox");
    pool.close().await;
    rows.into_iter().collect()
}

/// `text` without terminal colour codes (`ESC [ ... m`).
fn strip_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The inventory group's live members (per the ownership table) and what each reads of
/// orders.v1.
async fn members(stack: &Stack) -> HashMap<Uuid, Vec<i32>> {
    let pool = stack.inventory_pool().await;
    let rows: Vec<(Uuid, Vec<i32>)> = sqlx::query_as(
        "SELECT member, partitions FROM consumer_members WHERE consumer_group = $1 AND topic = $2 \
         AND seen_at > clock_timestamp() - interval '15 seconds'",
    )
    .bind(GROUP)
    .bind(schemas::ORDERS_TOPIC)
    .fetch_all(&pool)
    .await
    .expect("consumer_members");
    pool.close().await;
    rows.into_iter().collect()
}

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_consumer_resuming_inside_a_batch_misses_nothing() {
        e2e::requires_own_stack("starts inventory-service at an offset it sets");
        let (stack, records) = resume_inside_a_batch("local_broker_resume_in_batch", false).await;
        // The OrderPlaced records (every one in the batches the consumer resumes inside) leave an
        // inbox row; the OrderRejected after them are passed by with none.
        let records: Vec<_> = records
            .into_iter()
            .filter(|r| {
                r.header("event-type")
                    .and_then(schemas::Event::readers_of)
                    .is_some_and(|readers| readers.contains(&GROUP))
            })
            .collect();
        let wanted = records.len();
        eventually(TIMEOUT, || async {
            Ok((applied(&stack, &records).await.len() == wanted).then_some(()))
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "records of orders.v1 from offset 1 on were not all applied; {}",
                stack.where_logs_are()
            )
        });
        let gaps = stack
            .metric(
                &stack.inventory_url,
                "consumer_offset_gaps_total",
                &[("group", GROUP)],
            )
            .await;
        assert_eq!(gaps, 0.0, "no records skipped, none counted");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn when_the_broker_skips_records_the_consumer_counts_and_logs_the_gap() {
        e2e::requires_own_stack("starts a broker with a fault");
        let (stack, records) = resume_inside_a_batch("local_broker_skips", true).await;
        // The records of each partition's first batch after offset 1 are skipped by the broker;
        // the later ones are read, and the jump is noticed.
        let gaps = eventually(TIMEOUT, || async {
            let gaps = stack
                .metric(
                    &stack.inventory_url,
                    "consumer_offset_gaps_total",
                    &[("group", GROUP)],
                )
                .await;
            Ok((gaps > 0.0).then_some(gaps))
        })
        .await
        .unwrap_or_else(|_| panic!("no offset gap was counted; {}", stack.where_logs_are()));
        let log = strip_colours(
            &std::fs::read_to_string(stack.log_dir().join("inventory-service.log")).unwrap(),
        );
        let line = log
            .lines()
            .find(|l| l.contains("records skipped"))
            .expect("the gap is logged");
        assert!(
            line.contains("first_missing=1") && line.contains("topic=orders.v1"),
            "the log line names the missing range: {line}"
        );
        let applied = applied(&stack, &records).await;
        assert!(
            applied.len() < records.len(),
            "{gaps} gaps counted, yet all {} records were applied",
            records.len()
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn partitions_left_to_a_dead_member_get_a_live_reader() {
        e2e::requires_own_stack("kills and starts inventory-service instances");
        let stack = Stack::start("local_broker_stranded").await;
        stack.put_product("A", 100, 1_000).await;
        // A second instance joins; once both read partitions, it is killed and a third joins at
        // once, before the dead one's session expires: the broker can then assign partitions to
        // the dead member and never take them back. It does not always (an ordinary rebalance
        // may leave the dead member out): then the newest instance is killed and another joins,
        // until a partition is seen without a live reader (`consumer_unowned_partitions`, which
        // the watchdog of every live instance exports).
        let (mut victim, _listener) = stack
            .spawn_instance(Process::InventoryService, "inventory-service-2")
            .await;
        eventually(TIMEOUT, || async {
            let members = members(&stack).await;
            Ok((members.len() == 2 && members.values().all(|p| !p.is_empty())).then_some(()))
        })
        .await
        .expect("both instances read partitions");
        let mut live_url = String::new();
        let mut stranded = false;
        for round in 3..=8 {
            victim.kill9();
            let (next, listener) = stack
                .spawn_instance(
                    Process::InventoryService,
                    &format!("inventory-service-{round}"),
                )
                .await;
            (victim, live_url) = (next, e2e::url_of(&listener));
            let urls = [stack.inventory_url.clone(), live_url.clone()];
            // The dead member counts as live for 15 s after its last report, and the watchdog
            // checks every 5 s: a stranding shows within about 25 s.
            stranded = eventually(Duration::from_secs(40), || async {
                let mut unowned = 0.0;
                for url in &urls {
                    unowned += stack
                        .metric(url, "consumer_unowned_partitions", &[("group", GROUP)])
                        .await;
                }
                Ok((unowned > 0.0).then_some(()))
            })
            .await
            .is_ok();
            if stranded {
                break;
            }
            println!(
                "round {round}: the broker stranded no partition; killing the newest instance"
            );
        }
        assert!(
            stranded,
            "the broker never stranded a partition in 6 rounds"
        );

        let ids: Vec<Uuid> = futures::stream::iter(0..30)
            .map(|_| stack.place_order(&[("A", 1)]))
            .buffer_unordered(8)
            .collect()
            .await;
        stack
            .wait_for_statuses(&ids, &["CONFIRMED"], Duration::from_secs(90))
            .await;
        stack.assert_stock_conserved(&[("A", 1_000)]).await;
        // The partitions came back because the watchdog forced a rebalance.
        let mut forced = 0.0;
        for url in [&stack.inventory_url, &live_url] {
            forced += stack
                .metric(url, "consumer_forced_rebalances_total", &[("group", GROUP)])
                .await;
        }
        assert!(
            forced >= 1.0,
            "the ownership watchdog never forced a rebalance; {}",
            stack.where_logs_are()
        );
    }
}
