//! The broker's fetch, spoken to directly (`e2e::wire`): Kafka's semantics, which the local Tansu
//! broker has only with the project's patch (scripts/tansu/tansu-storage/0002-*). A fetch from any
//! offset returns the whole batch that holds it and then the following ones, each record once; the
//! high watermark is the next offset; a fetch outside the log is OFFSET_OUT_OF_RANGE. Against a
//! running stack these run on its broker (Kafka itself, in Compose), which must agree.

use std::collections::HashSet;

use anyhow::ensure;
use e2e::Broker;
use e2e::wire::{Connection, OFFSET_OUT_OF_RANGE};
use uuid::Uuid;

const VALUES: [&str; 5] = ["a", "b", "c", "d", "e"];

/// A connection to `broker` and a new one-partition topic holding a, b, c as one batch (offsets
/// 0-2) and d, e as another (3-4).
async fn two_batches(broker: &Broker) -> (Connection, String) {
    let mut connection = Connection::connect(&broker.bootstrap)
        .await
        .expect("connect");
    let topic = format!("fetch-{}", Uuid::new_v4().simple());
    connection
        .create_topic(&topic, 1)
        .await
        .expect("create topic");
    let first = connection
        .produce_batch(&topic, 0, &VALUES[..3])
        .await
        .expect("produce a, b, c");
    let second = connection
        .produce_batch(&topic, 0, &VALUES[3..])
        .await
        .expect("produce d, e");
    assert_eq!((first, second), (0, 3), "the batches' base offsets");
    let stored = connection
        .fetch(&topic, 0, 0, 1_000)
        .await
        .expect("fetch from 0");
    let spans: Vec<(i64, i32)> = stored
        .batches()
        .expect("batches")
        .iter()
        .map(|b| (b.base_offset, b.record_count))
        .collect();
    assert_eq!(
        spans,
        [(0, 3), (3, 2)],
        "the log holds two batches, of 3 and 2 records"
    );
    (connection, topic)
}

/// What a consumer must get from every offset of [`two_batches`]' topic: the batch holding the
/// offset first, then the rest; once the client drops the records below the offset, exactly the
/// records from there on, none twice; and the watermark after the last one.
async fn check_fetches(connection: &mut Connection, topic: &str) -> anyhow::Result<()> {
    for from in 0..VALUES.len() as i64 {
        let fetched = connection.fetch(topic, 0, from, 1_000).await?;
        ensure!(
            fetched.error_code == 0,
            "fetch from {from}: error {}",
            fetched.error_code
        );
        let sent = fetched.records()?;
        let offsets: HashSet<i64> = sent.iter().map(|(offset, _)| *offset).collect();
        ensure!(
            offsets.len() == sent.len(),
            "fetch from {from} sent a record twice: {sent:?}"
        );
        let batches = fetched.batches()?;
        ensure!(
            batches.first().is_some_and(|batch| batch.holds(from)),
            "fetch from {from} did not start with the batch holding it: {batches:?}"
        );
        let kept: Vec<(i64, String)> = sent.into_iter().filter(|(o, _)| *o >= from).collect();
        let wanted: Vec<(i64, String)> = (from..VALUES.len() as i64)
            .map(|offset| (offset, VALUES[offset as usize].to_owned()))
            .collect();
        ensure!(
            kept == wanted,
            "fetch from {from} gave {kept:?}, not {wanted:?}"
        );
        ensure!(
            fetched.high_watermark == 5,
            "fetch from {from}: high watermark {}, not 5",
            fetched.high_watermark
        );
    }
    let latest = connection.latest_offset(topic, 0).await?;
    ensure!(
        latest == 5,
        "ListOffsets latest is {latest}, not the high watermark 5"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fetch_from_any_offset_returns_the_records_from_there_once_each() {
    let broker = Broker::for_test(&e2e::test_log_dir("broker_fetch_any_offset")).await;
    let (mut connection, topic) = two_batches(&broker).await;
    check_fetches(&mut connection, &topic).await.unwrap();
    let at_end = connection
        .fetch(&topic, 0, 5, 100)
        .await
        .expect("fetch from 5");
    assert_eq!(at_end.error_code, 0, "a fetch at the watermark is in range");
    assert!(
        at_end.records().unwrap().is_empty(),
        "nothing after the watermark: {at_end:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fetch_outside_the_log_is_out_of_range_and_the_broker_goes_on() {
    let broker = Broker::for_test(&e2e::test_log_dir("broker_fetch_out_of_range")).await;
    let (mut connection, topic) = two_batches(&broker).await;
    for offset in [6, 1_000_000, i64::MAX, -5] {
        let fetched = connection
            .fetch(&topic, 0, offset, 10_000)
            .await
            .unwrap_or_else(|e| panic!("fetch from {offset}: {e:#}"));
        assert_eq!(
            fetched.error_code, OFFSET_OUT_OF_RANGE,
            "fetch from {offset} of a log holding 0-4"
        );
        assert!(fetched.records.is_empty(), "no records from {offset}");
    }
    check_fetches(&mut connection, &topic).await.unwrap();
}

/// Tests that need a broker of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    /// The fault the gap-detection test injects (TANSU_FAULT_FETCH_SKIPS_MID_BATCH: a fetch from
    /// inside a batch answers with the next batch, as unpatched Tansu 0.6.0 did) is one the
    /// checks above catch; so they can fail.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_broker_that_skips_inside_a_batch_fails_the_fetch_checks() {
        e2e::requires_own_stack("starts a broker with a fault");
        let dir = e2e::test_log_dir("broker_fetch_skipping");
        let broker = Broker::start_with(&dir, &[("TANSU_FAULT_FETCH_SKIPS_MID_BATCH", "1")]).await;
        let (mut connection, topic) = two_batches(&broker).await;
        let error = check_fetches(&mut connection, &topic)
            .await
            .expect_err("the skipping broker passed the fetch checks");
        assert!(
            error.to_string().contains("fetch from 1"),
            "the skip is found at offset 1, inside the first batch: {error:#}"
        );
    }
}
