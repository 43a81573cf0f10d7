//! Reading a whole topic from its beginning, as an operator's tool (`saga tail`, `saga dlq`) and
//! the tests do: every partition assigned (no group membership, nothing committed), each record
//! owned as a [`Delivery`] with all its headers in order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use crate::delivery::Delivery;
use crate::kafka::KafkaSettings;

/// Where a read stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    End(End),
    /// Never: keep reading what arrives.
    Follow,
}

/// The end of a topic: every partition has reached the high watermark read when the read
/// began, and no record has come for `quiet`. Tansu 0.6's high watermark can trail the log
/// (records a consumer already received lie past it), so the watermark alone is not the end.
/// With `within`, a read still going after that long fails instead of running on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    pub quiet: Duration,
    pub within: Option<Duration>,
}

impl End {
    /// Once the topic has been quiet for a second, however long that takes.
    pub const QUIET: End = End {
        quiet: Duration::from_secs(1),
        within: None,
    };
}

/// Calls `each` with every record of `topic` from the beginning, in offset order within each
/// partition, until `until`. `group` names the client to the broker; nothing is committed for
/// it. A broker connection that drops is waited for (up to 30 s), as the client reconnects. It
/// blocks: call it from a blocking thread in async code.
pub fn read_topic(
    kafka: &KafkaSettings,
    group: &str,
    topic: &str,
    until: Until,
    mut each: impl FnMut(Delivery),
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = kafka
        .consumer(&[("group.id", group), ("enable.auto.commit", "false")])
        .create()
        .context("creating Kafka consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        bail!("topic {topic} does not exist");
    }
    let mut ends = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for &p in &partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .with_context(|| format!("reading the watermarks of {topic}/{p}"))?;
        ends.insert(p, high);
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let started = Instant::now();
    let mut next: HashMap<i32, i64> = partitions.iter().map(|&p| (p, 0)).collect();
    let mut last_record = Instant::now();
    let mut read = 0_u64;
    let mut failing_since: Option<Instant> = None;
    loop {
        if let Until::End(End { quiet, within }) = until {
            let reached = ends.iter().all(|(p, end)| next[p] >= *end);
            if reached && last_record.elapsed() >= quiet {
                return Ok(());
            }
            if within.is_some_and(|within| started.elapsed() > within) {
                bail!("gave up reading {topic} after {read} records: its end did not come");
            }
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = match message {
            Ok(message) => {
                failing_since = None;
                message
            }
            // The client reconnects by itself; a broker away for longer fails the read.
            Err(KafkaError::MessageConsumption(code)) if is_transient(code) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > BROKER_AWAY_AT_MOST {
                    bail!(
                        "reading {topic}: the broker has been unreachable for {BROKER_AWAY_AT_MOST:?} ({code})"
                    );
                }
                tracing::debug!(%topic, %code, "the broker connection dropped while reading; the client reconnects");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let delivery = Delivery::from_message(&message);
        last_record = Instant::now();
        read += 1;
        next.insert(delivery.partition, delivery.offset + 1);
        each(delivery);
    }
}

/// How long a read waits for a broker connection that dropped to come back.
const BROKER_AWAY_AT_MOST: Duration = Duration::from_secs(30);

/// Errors the client reports while it reconnects by itself (a connection cut, every connection
/// down for a moment).
fn is_transient(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::RequestTimedOut
    )
}

/// Every record of `topic` from the beginning to its `end`, as [`read_topic`] reads them.
pub fn read_all(
    kafka: &KafkaSettings,
    group: &str,
    topic: &str,
    end: End,
) -> anyhow::Result<Vec<Delivery>> {
    let mut records = Vec::new();
    read_topic(kafka, group, topic, Until::End(end), |r| records.push(r))?;
    Ok(records)
}
