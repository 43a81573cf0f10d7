//! Reading and writing the broker's topics the way a user with `kcat` would.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use messaging::reader::{self, End};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

fn config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

pub async fn wait_for_broker(bootstrap: &str, timeout: Duration) -> anyhow::Result<()> {
    wait_for_broker_with(bootstrap, &[], timeout).await
}

/// [`wait_for_broker`] for a client that needs `properties` (`KEY=VALUE`, TLS for example).
pub async fn wait_for_broker_with(
    bootstrap: &str,
    properties: &[String],
    timeout: Duration,
) -> anyhow::Result<()> {
    let bootstrap = bootstrap.to_owned();
    let properties = properties.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut client = config(&bootstrap);
        for p in &properties {
            if let Some((k, v)) = p.split_once('=') {
                client.set(k, v);
            }
        }
        let consumer: BaseConsumer = client.create()?;
        let deadline = Instant::now() + timeout;
        loop {
            match consumer.fetch_metadata(None, Duration::from_secs(2)) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => bail!("broker {bootstrap} not up: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    })
    .await?
}

pub use messaging::delivery::Delivery;

/// The events of order `order_id` on `topic`, in offset order per partition (one partition per
/// order). A record that names the order (by key or by its decoded order id) and does not decode
/// fails the caller: it is one of the order's events gone wrong, not something to skip. Records
/// of other orders (other tests' on a shared stack) are not looked at.
pub async fn events_of(bootstrap: &str, topic: &str, order_id: uuid::Uuid) -> Vec<schemas::Event> {
    let key = order_id.to_string();
    let mut events = Vec::new();
    for r in read_topic(bootstrap, topic)
        .await
        .unwrap_or_else(|e| panic!("reading {topic}: {e}"))
    {
        match r.event() {
            Ok(e) if e.order_id() == order_id => events.push(e),
            Ok(_) => {}
            Err(e) if r.key_str() == Some(key.as_str()) => panic!(
                "{topic}[{}]@{}, keyed by order {order_id}, does not decode: {e}",
                r.partition, r.offset
            ),
            Err(_) => {}
        }
    }
    events
}

/// Every record of `topic` from the beginning to the current end of each partition.
pub async fn read_topic(bootstrap: &str, topic: &str) -> anyhow::Result<Vec<Delivery>> {
    let kafka = messaging::kafka::KafkaSettings::new(bootstrap);
    let topic = topic.to_owned();
    let group = format!("e2e-reader-{}", uuid::Uuid::new_v4());
    let end = End {
        quiet: Duration::from_millis(1500),
        within: Some(Duration::from_secs(60)),
    };
    tokio::task::spawn_blocking(move || reader::read_all(&kafka, &group, &topic, end)).await?
}

/// Produces one record and waits for the acknowledgement.
pub async fn produce(
    bootstrap: &str,
    topic: &str,
    partition: Option<i32>,
    key: Option<&str>,
    headers: &[(&str, &str)],
    payload: &[u8],
) -> anyhow::Result<()> {
    let producer: FutureProducer = config(bootstrap).create()?;
    let mut owned = OwnedHeaders::new();
    for (k, v) in headers {
        owned = owned.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    let mut record: FutureRecord<'_, str, [u8]> =
        FutureRecord::to(topic).payload(payload).headers(owned);
    if let Some(k) = key {
        record = record.key(k);
    }
    if let Some(p) = partition {
        record = record.partition(p);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("producing to {topic}: {e}"))?;
    Ok(())
}

/// A record to produce with [`produce_many`]: raw bytes everywhere, as a hostile producer sends.
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub payload: Option<Vec<u8>>,
}

impl Outgoing {
    /// The same record again, to the same topic: key, headers (null values sent as empty) and
    /// value.
    pub fn copy_of(record: &Delivery) -> Outgoing {
        Outgoing {
            topic: record.topic.clone(),
            key: record.key.clone(),
            headers: record
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
                .collect(),
            payload: record.payload.clone(),
        }
    }
}

/// Produces `records` with one producer, all in flight at once, and returns where each landed
/// (partition, offset), in the order given.
pub async fn produce_many(
    bootstrap: &str,
    records: &[Outgoing],
) -> anyhow::Result<Vec<(i32, i64)>> {
    let producer: FutureProducer = config(bootstrap)
        .set("message.max.bytes", "2000000")
        .create()?;
    let sends = records.iter().map(|r| {
        let mut owned = OwnedHeaders::new();
        for (k, v) in &r.headers {
            owned = owned.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&r.topic).headers(owned);
        if let Some(k) = &r.key {
            record = record.key(k);
        }
        if let Some(p) = &r.payload {
            record = record.payload(p);
        }
        let topic = r.topic.clone();
        let send = producer.send(record, Duration::from_secs(30));
        async move {
            send.await
                .map(|d| (d.partition, d.offset))
                .map_err(|(e, _)| anyhow::anyhow!("producing to {topic}: {e}"))
        }
    });
    futures::future::try_join_all(sends).await
}

/// Commits `offsets` (partition, next offset to read) of `topic` for consumer group `group`, as
/// an operator resetting a group's offsets would (the group should have no live member).
pub async fn commit_offsets(
    bootstrap: &str,
    group: &str,
    topic: &str,
    offsets: &[(i32, i64)],
) -> anyhow::Result<()> {
    let (bootstrap, group, topic, offsets) = (
        bootstrap.to_owned(),
        group.to_owned(),
        topic.to_owned(),
        offsets.to_vec(),
    );
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config(&bootstrap)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()?;
        let mut list = TopicPartitionList::new();
        for (partition, offset) in &offsets {
            list.add_partition_offset(&topic, *partition, Offset::Offset(*offset))?;
        }
        consumer
            .commit(&list, rdkafka::consumer::CommitMode::Sync)
            .with_context(|| format!("committing {offsets:?} of {topic} for {group}"))?;
        Ok(())
    })
    .await?
}

/// Every topic of the broker but its internal ones, with the sum of its partitions' high
/// watermarks: what has ever been produced to it (for a check that something produced nothing).
pub async fn high_watermarks(
    bootstrap: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, i64>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = config(bootstrap)
        .set("group.id", "e2e-watermarks")
        .create()?;
    tokio::task::spawn_blocking(move || {
        let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
        let mut marks = std::collections::BTreeMap::new();
        for topic in metadata.topics() {
            if topic.name().starts_with("__") {
                continue;
            }
            let mut sum = 0;
            for p in topic.partitions() {
                let (_, high) =
                    consumer.fetch_watermarks(topic.name(), p.id(), Duration::from_secs(10))?;
                sum += high;
            }
            marks.insert(topic.name().to_owned(), sum);
        }
        Ok(marks)
    })
    .await?
}
