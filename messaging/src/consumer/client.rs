//! The rdkafka side of a consumer group: the client and its settings, what it logs on
//! rebalances, the lag it exports, the check for records the broker skipped, and closing it
//! within a bound when the broker is gone.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics::counter;
use rdkafka::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};

use crate::delivery::Delivery;
use crate::kafka;
use crate::offset_gaps::GapTracker;

pub(super) type GroupConsumer = StreamConsumer<GroupContext>;

/// Logs what the group coordinator gives and takes, so an idle consumer says why, and tracks the
/// offsets received to notice records skipped.
pub(super) struct GroupContext {
    pub(super) group: String,
    gaps: std::sync::Mutex<GapTracker>,
}

impl ClientContext for GroupContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): the lag of each assigned
    /// partition, in messages between the high watermark and the committed offset, as
    /// `consumer_lag_messages{group, topic, partition}`. Unknown lags (-1) are not exported.
    /// On Tansu 0.6 the high watermark can trail (see the README), so lag can read low there.
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!("consumer_lag_messages", "group" => self.group.clone(),
                    "topic" => topic.clone(), "partition" => partition.to_string())
                .set(p.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Where each partition continues is learnt again from the committed offsets.
        self.gaps.lock().expect("gap tracker").forget_all();
        let describe = |list: &rdkafka::TopicPartitionList| {
            list.elements()
                .iter()
                .map(|e| format!("{}[{}]", e.topic(), e.partition()))
                .collect::<Vec<_>>()
        };
        match rebalance {
            Rebalance::Assign(list) => {
                tracing::info!(group = %self.group, partitions = ?describe(list), "partitions assigned")
            }
            Rebalance::Revoke(list) => {
                tracing::info!(group = %self.group, partitions = ?describe(list), "partitions revoked")
            }
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "group rebalance failed")
            }
        }
    }
}

pub(super) fn stream_consumer(
    kafka: &kafka::KafkaSettings,
    group_id: &str,
    topics: &[&str],
) -> anyhow::Result<GroupConsumer> {
    let consumer: GroupConsumer = kafka
        .consumer(&[
            ("group.id", group_id),
            ("enable.auto.commit", "true"),
            ("auto.commit.interval.ms", "500"),
            // Offsets are stored by hand, after the inbox transaction commits.
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("session.timeout.ms", "10000"),
            // A third of the session timeout, as Kafka recommends: fewer wake-ups when idle.
            ("heartbeat.interval.ms", "3000"),
            // The broker answers a fetch as soon as records arrive, or when this wait ends with
            // none: it bounds how often an idle consumer asks, not how late a record comes, so it
            // is four times Kafka's default of 500 ms to keep an idle stack quiet (eight
            // consumers per stack). The local Tansu broker does the same with the project's
            // patch; unpatched, it held every fetch for this whole wait.
            ("fetch.wait.max.ms", "2000"),
            // A transient outage or a retry delay is waited out inside one record; stay in the
            // group.
            ("max.poll.interval.ms", "86400000"),
            // Per-partition lag for the `consumer_lag_messages` gauge.
            ("statistics.interval.ms", "5000"),
        ])
        .create_with_context(GroupContext {
            group: group_id.to_owned(),
            gaps: Default::default(),
        })
        .context("creating Kafka consumer")?;
    consumer
        .subscribe(topics)
        .with_context(|| format!("subscribing to {topics:?}"))?;
    Ok(consumer)
}

/// How long closing the consumers (their final offset commit and leaving the group) may take at
/// shutdown before the process goes on without it.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// Commits each consumer's stored offsets and closes it (leaving its group), off the async
/// runtime and for at most [`CLOSE_WITHIN`]: during a broker outage both would wait for the
/// broker. Offsets not committed are read again after the restart, and the inbox skips them.
pub(super) async fn close(consumers: Vec<Arc<GroupConsumer>>) {
    let closing = tokio::task::spawn_blocking(move || {
        for consumer in consumers {
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, "final offset commit");
            }
            drop(consumer);
        }
    });
    if tokio::time::timeout(CLOSE_WITHIN, closing).await.is_err() {
        tracing::warn!(within = ?CLOSE_WITHIN,
            "the Kafka consumers did not close in time (is the broker reachable?); stopping without their final offset commit");
    }
}

/// Counts and logs records the broker skipped before `delivery` (see [`crate::offset_gaps`]).
/// The first record of a partition after an assignment is compared with the group's committed
/// offset, read from the broker.
pub(super) async fn check_for_gap(consumer: &Arc<GroupConsumer>, delivery: &Delivery) {
    let (topic, partition) = (delivery.topic.as_str(), delivery.partition);
    let known = consumer
        .context()
        .gaps
        .lock()
        .expect("gap tracker")
        .knows(topic, partition);
    if !known && let Some(committed) = committed_offset(consumer, topic, partition).await {
        consumer
            .context()
            .gaps
            .lock()
            .expect("gap tracker")
            .expect(topic, partition, committed);
    }
    let gap = consumer
        .context()
        .gaps
        .lock()
        .expect("gap tracker")
        .observe(topic, partition, delivery.offset);
    if let Some(missing) = gap {
        let group = &consumer.context().group;
        tracing::error!(%group, %topic, partition, first_missing = *missing.start(), last_missing = *missing.end(),
            received = delivery.offset, "records skipped: the broker delivered this offset after an earlier \
            one with records missing in between; `saga audit` lists any that were never applied");
        counter!("consumer_offset_gaps_total", "group" => group.clone(), "topic" => topic.to_owned())
            .increment(1);
    }
}

/// The group's committed offset of one partition, when there is one.
async fn committed_offset(
    consumer: &Arc<GroupConsumer>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition(topic, partition);
    let consumer = consumer.clone();
    let committed = tokio::task::spawn_blocking(move || {
        consumer.committed_offsets(list, Duration::from_secs(5))
    })
    .await
    .ok()?
    .map_err(|e| tracing::debug!(error = %e, "could not read the committed offset"))
    .ok()?;
    let element = committed.elements().into_iter().next()?;
    element.offset().to_raw().filter(|o| *o >= 0)
}
