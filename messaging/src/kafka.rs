//! Kafka client configuration shared by every process, and topic creation at start (the local
//! broker does not create topics on first use).

use std::time::Duration;

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

/// The saga's event topics.
pub const EVENT_TOPICS: [&str; 2] = [schemas::ORDERS_TOPIC, schemas::INVENTORY_TOPIC];

/// The dead-letter topic of a consumer group.
pub fn dead_letter_topic(group: &str) -> String {
    format!("{group}.dlq")
}

/// A client configuration with the bootstrap servers and settings every client here shares.
pub fn client_config(bootstrap_servers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap_servers)
        .set("socket.keepalive.enable", "true")
        .set("reconnect.backoff.max.ms", "2000");
    config
}

/// Producer settings for messages that must not be lost or reordered: idempotent, acknowledged by
/// all in-sync replicas, and never given up on (`message.timeout.ms=0`): during a broker outage a
/// send waits rather than fails, so an outage delays work but never drops or reorders it.
pub fn reliable_producer_config(bootstrap_servers: &str) -> ClientConfig {
    let mut config = client_config(bootstrap_servers);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "0")
        .set("linger.ms", "1")
        .set("compression.type", "none");
    config
}

/// Creates each topic that does not exist yet; topics that exist are left as they are.
pub async fn ensure_topics(
    bootstrap_servers: &str,
    topics: &[&str],
    partitions: i32,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap_servers)
        .create()
        .context("creating Kafka admin client")?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(new_topics.iter(), &options)
        .await
        .context("asking the broker to create topics")?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(%topic, partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Like [`ensure_topics`], retrying with backoff until the broker answers, logging each failure.
pub async fn ensure_topics_with_retry(bootstrap_servers: &str, topics: &[&str], partitions: i32) {
    let mut delay = Duration::from_millis(200);
    loop {
        match ensure_topics(bootstrap_servers, topics, partitions).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), ?delay, "topics not ready; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
