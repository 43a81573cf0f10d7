//! Reading a whole topic from the beginning.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::{Message, Offset, TopicPartitionList};

/// One record, owned.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Option<String>)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    pub fn key_text(&self) -> Option<String> {
        self.key
            .as_ref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }

    /// The headers without those whose name starts with `prefix`.
    pub fn headers_without(&self, prefix: &str) -> OwnedHeaders {
        self.headers
            .iter()
            .filter(|(k, _)| !k.starts_with(prefix))
            .fold(OwnedHeaders::new(), |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: value.as_deref(),
                })
            })
    }
}

/// Calls `each` for every record of `topic` from the beginning, in partition order; stops at the
/// end (once the topic has been quiet for a moment, since a broker's high watermark can trail),
/// or keeps reading with `follow`.
/// It blocks: this is a command-line tool.
pub fn each_record(
    kafka: &messaging::kafka::KafkaSettings,
    topic: &str,
    follow: bool,
    mut each: impl FnMut(Record),
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = kafka
        .consumer(&[("group.id", "saga-cli"), ("enable.auto.commit", "false")])
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
        anyhow::bail!("topic {topic} does not exist");
    }
    let mut ends = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, *p, Duration::from_secs(10))
            .with_context(|| format!("watermarks of {topic}/{p}"))?;
        ends.insert(*p, high);
        assignment.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut next: HashMap<i32, i64> = partitions.iter().map(|p| (*p, 0)).collect();
    let quiet = Duration::from_millis(1000);
    let mut last = Instant::now();
    loop {
        let reached = ends.iter().all(|(p, end)| next[p] >= *end);
        if !follow && reached && last.elapsed() >= quiet {
            return Ok(());
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = message?;
        last = Instant::now();
        next.insert(m.partition(), m.offset() + 1);
        each(Record {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers: m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                h.value.map(|v| String::from_utf8_lossy(v).into_owned()),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
}
