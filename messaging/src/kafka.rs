//! How every process reaches Kafka: the bootstrap servers, the client settings this project relies
//! on, the user's own librdkafka properties on top (`--kafka-config`), and topic creation at start
//! (the local broker does not create topics on first use).
//!
//! # User properties (`--kafka-config KEY=VALUE`, `KAFKA_CONFIG`)
//! Any librdkafka property can be given, repeatedly on the command line or `;`-separated in the
//! variable, so that producers and consumers can be tuned (and secured: TLS, SASL) for a cluster
//! without a rebuild. A key prefixed `producer.` or `consumer.` applies only to that kind of
//! client; an unprefixed key applies to every client of the process (librdkafka ignores, with a
//! warning, a producer property given to a consumer). User properties are applied after ours, so
//! they win, except for the few the promises rest on, which are refused at start with the reason
//! ([`PROTECTED`]).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

/// The dead-letter topic of a consumer group.
pub fn dead_letter_topic(group: &str) -> String {
    format!("{group}.dlq")
}

/// librdkafka properties a user may not set, and why: each one carries a promise.
pub const PROTECTED: &[(&str, &str)] = &[
    (
        "bootstrap.servers",
        "set it with --kafka-bootstrap-servers / KAFKA_BOOTSTRAP_SERVERS",
    ),
    (
        "metadata.broker.list",
        "set it with --kafka-bootstrap-servers / KAFKA_BOOTSTRAP_SERVERS",
    ),
    (
        "enable.idempotence",
        "the idempotent producer keeps each order's events in order across its own retries",
    ),
    (
        "acks",
        "records are acknowledged by all in-sync replicas before an outbox row is deleted",
    ),
    (
        "request.required.acks",
        "records are acknowledged by all in-sync replicas before an outbox row is deleted",
    ),
    (
        "message.timeout.ms",
        "a send never gives up during an outage, so an outage delays records but never drops or reorders them",
    ),
    (
        "delivery.timeout.ms",
        "a send never gives up during an outage, so an outage delays records but never drops or reorders them",
    ),
    (
        "enable.gapless.guarantee",
        "a record that fails for good stops the producer instead of letting later records of its order overtake it",
    ),
    ("group.id", "consumer groups are named by the service"),
    (
        "enable.auto.offset.store",
        "offsets are stored only after the inbox transaction commits",
    ),
    (
        "enable.auto.commit",
        "the stored offsets are committed in the background",
    ),
    (
        "auto.offset.reset",
        "a new consumer group must read each topic from its first record",
    ),
    (
        "enable.partition.eof",
        "the consumers do not handle end-of-partition events",
    ),
];

/// Which clients a user property applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every client (unprefixed key).
    All,
    /// Producers only (`producer.` prefix).
    Producer,
    /// Consumers only (`consumer.` prefix).
    Consumer,
    /// Admin clients (topic creation); they take only [`Role::All`] properties.
    Admin,
}

/// One `--kafka-config` property: `[producer.|consumer.]KEY=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property {
    pub role: Role,
    pub key: String,
    pub value: String,
}

impl FromStr for Property {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?}: expected KEY=VALUE (a librdkafka property)"))?;
        let key = key.trim();
        let (role, key) = if let Some(k) = key.strip_prefix("producer.") {
            (Role::Producer, k)
        } else if let Some(k) = key.strip_prefix("consumer.") {
            (Role::Consumer, k)
        } else {
            (Role::All, key)
        };
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
        {
            return Err(format!(
                "{text:?}: {key:?} is not a librdkafka property name"
            ));
        }
        if let Some((_, why)) = PROTECTED.iter().find(|(k, _)| *k == key) {
            return Err(format!("{key} cannot be overridden: {why}"));
        }
        Ok(Property {
            role,
            key: key.to_owned(),
            value: value.trim().to_owned(),
        })
    }
}

impl fmt::Display for Property {
    /// `KEY=VALUE` with its prefix; values of secrets (`*password*`, `*secret*`, `*.key.pem`) are
    /// hidden, so that settings can be logged.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self.role {
            Role::Producer => "producer.",
            Role::Consumer => "consumer.",
            Role::All | Role::Admin => "",
        };
        let secret = ["password", "secret", "key.pem", "jaas"]
            .iter()
            .any(|s| self.key.contains(s));
        let value = if secret { "***" } else { &self.value };
        write!(f, "{prefix}{}={value}", self.key)
    }
}

/// Where Kafka is and the user's client properties; every process flattens this into its
/// settings.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaSettings {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        short = 'b',
        visible_alias = "bootstrap-servers",
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    pub kafka_bootstrap_servers: String,
    /// A librdkafka property for this process's Kafka clients, KEY=VALUE; prefix the key with
    /// `producer.` or `consumer.` to set it for one kind of client only. Repeat the flag, or
    /// separate properties with `;` in the variable. Example: `security.protocol=ssl`.
    #[arg(
        long = "kafka-config",
        env = "KAFKA_CONFIG",
        value_name = "KEY=VALUE",
        value_delimiter = ';',
        global = true
    )]
    pub kafka_config: Vec<Property>,
}

impl KafkaSettings {
    /// The local broker's address and no properties of the user's.
    pub fn new(bootstrap_servers: &str) -> KafkaSettings {
        KafkaSettings {
            kafka_bootstrap_servers: bootstrap_servers.to_owned(),
            kafka_config: Vec::new(),
        }
    }

    /// The settings every client here shares, for a client of `role`, with the user's
    /// properties for that role applied last. A client with settings of its own uses
    /// [`Self::producer`] or [`Self::consumer`], which apply the user's properties after them.
    pub fn client(&self, role: Role) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.kafka_bootstrap_servers)
            .set("socket.keepalive.enable", "true")
            .set("reconnect.backoff.max.ms", "2000");
        self.apply_user(&mut config, role);
        config
    }

    /// Applies the user's properties for `role` to `config`, over what is already set.
    pub fn apply_user(&self, config: &mut ClientConfig, role: Role) {
        for p in &self.kafka_config {
            if p.role == Role::All || p.role == role {
                config.set(&p.key, &p.value);
            }
        }
    }

    /// Producer settings for messages that must not be lost or reordered: idempotent,
    /// acknowledged by all in-sync replicas, never given up on (`message.timeout.ms=0`: during
    /// a broker outage a send waits rather than fails, so an outage delays work but never drops
    /// or reorders it), and gapless: should a record still fail for good, the producer fails
    /// fatally instead of sending the records behind it, so no later record of an order can
    /// overtake an earlier one. The user's producer properties come on top.
    pub fn producer(&self) -> ClientConfig {
        let mut config = self.client(Role::Producer);
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "0")
            .set("enable.gapless.guarantee", "true")
            .set("linger.ms", "1")
            .set("compression.type", "none");
        self.apply_user(&mut config, Role::Producer);
        config
    }

    /// `ours` (a consumer's own settings), then the user's consumer properties on top.
    pub fn consumer(&self, ours: &[(&str, &str)]) -> ClientConfig {
        let mut config = self.client(Role::Consumer);
        for (k, v) in ours {
            config.set(*k, *v);
        }
        self.apply_user(&mut config, Role::Consumer);
        config
    }

    /// The user's properties, secrets hidden, for the start-up log line.
    pub fn describe_user_config(&self) -> Vec<String> {
        self.kafka_config.iter().map(|p| p.to_string()).collect()
    }
}

/// A topic and the retention it is created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub retention: Duration,
}

impl TopicSpec {
    pub fn new(name: impl Into<String>, retention: Duration) -> TopicSpec {
        TopicSpec {
            name: name.into(),
            retention,
        }
    }

    /// `retention.ms`, and `segment.ms` no longer than it: Kafka deletes whole segments, so a
    /// record lives at most retention + segment time, here at most twice the retention.
    fn configs(&self) -> [(&'static str, String); 2] {
        let retention = self.retention.as_millis().min(i64::MAX as u128) as i64;
        let segment = retention.min(24 * 3600 * 1000);
        [
            ("retention.ms", retention.to_string()),
            ("segment.ms", segment.to_string()),
        ]
    }
}

/// How long a topic keeps its records, as the broker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// `retention.ms` of this many milliseconds.
    Millis(u64),
    /// `retention.ms=-1`: records are kept for ever.
    Forever,
    /// The broker did not say (no such topic, no `retention.ms` in its answer, or no answer).
    Unknown,
}

impl Retention {
    fn parse(value: Option<&str>) -> Retention {
        match value.map(str::parse::<i64>) {
            Some(Ok(-1)) => Retention::Forever,
            Some(Ok(ms)) if ms >= 0 => Retention::Millis(ms as u64),
            _ => Retention::Unknown,
        }
    }
}

/// Creates each topic that does not exist yet, with its retention; topics that exist are left
/// as they are. Returns what the broker says each topic's retention is, and logs a warning for a
/// topic that keeps records for another time than `topics` asks (an operator's choice, or a
/// topic created before: the system does not change it).
pub async fn ensure_topics(
    kafka: &KafkaSettings,
    topics: &[TopicSpec],
    partitions: i32,
) -> anyhow::Result<Vec<(String, Retention)>> {
    probe(kafka).await?;
    let admin: AdminClient<DefaultClientContext> = kafka
        .client(Role::Admin)
        .create()
        .context("creating Kafka admin client")?;
    let configs: Vec<_> = topics.iter().map(TopicSpec::configs).collect();
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .zip(&configs)
        .map(|(t, configs)| {
            configs.iter().fold(
                NewTopic::new(&t.name, partitions, TopicReplication::Fixed(1)),
                |topic, (k, v)| topic.set(k, v),
            )
        })
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
    let specifiers: Vec<ResourceSpecifier<'_>> = topics
        .iter()
        .map(|t| ResourceSpecifier::Topic(&t.name))
        .collect();
    let described = admin.describe_configs(specifiers.iter(), &options).await;
    let mut retentions = Vec::new();
    for (i, spec) in topics.iter().enumerate() {
        let retention = match &described {
            Ok(results) => match results.get(i) {
                Some(Ok(resource)) => Retention::parse(
                    resource
                        .get("retention.ms")
                        .and_then(|e| e.value.as_deref()),
                ),
                _ => Retention::Unknown,
            },
            Err(_) => Retention::Unknown,
        };
        let wanted = Retention::Millis(spec.retention.as_millis() as u64);
        if retention != wanted {
            tracing::warn!(topic = %spec.name, broker_says = ?retention, wanted = ?spec.retention,
                "the topic keeps its records for another time than configured; leaving it as it is (change it with kafka-configs if that is not intended)");
        }
        retentions.push((spec.name.clone(), retention));
    }
    Ok(retentions)
}

/// Asks the broker for its metadata with a client that surfaces why a connection fails (TLS,
/// SASL, name resolution) as log lines at once: the admin client keeps librdkafka's logs and
/// errors queued until it is dropped, so a broker with an untrusted certificate would otherwise
/// look like one that is merely slow.
async fn probe(kafka: &KafkaSettings) -> anyhow::Result<()> {
    let config = kafka.client(Role::Admin);
    tokio::task::spawn_blocking(move || {
        let consumer: rdkafka::consumer::BaseConsumer = config
            .create()
            .context("creating a Kafka client to reach the broker")?;
        let result =
            rdkafka::consumer::Consumer::fetch_metadata(&consumer, None, Duration::from_secs(10));
        // Serve what librdkafka queued meanwhile (the reason a connection failed) into the log.
        let _ = consumer.poll(Duration::from_millis(100));
        result.map(|_| ()).context("reaching the broker")
    })
    .await
    .context("the broker probe")?
}

/// Like [`ensure_topics`], retrying with backoff until the broker answers, logging each failure.
pub async fn ensure_topics_with_retry(
    kafka: &KafkaSettings,
    topics: &[TopicSpec],
    partitions: i32,
) -> Vec<(String, Retention)> {
    let mut delay = Duration::from_millis(200);
    loop {
        match ensure_topics(kafka, topics, partitions).await {
            Ok(retentions) => return retentions,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), ?delay, "topics not ready; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Property, String> {
        text.parse()
    }

    #[test]
    fn a_property_applies_to_the_clients_its_prefix_names() {
        let settings = KafkaSettings {
            kafka_bootstrap_servers: "b:9092".into(),
            kafka_config: vec![
                parse("client.id=saga").unwrap(),
                parse("producer.batch.num.messages=1").unwrap(),
                parse("consumer.fetch.wait.max.ms=10").unwrap(),
            ],
        };
        let producer = settings.producer();
        assert_eq!(producer.get("batch.num.messages"), Some("1"));
        assert_eq!(producer.get("fetch.wait.max.ms"), None);
        assert_eq!(producer.get("client.id"), Some("saga"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        let consumer = settings.consumer(&[("fetch.wait.max.ms", "50"), ("group.id", "g")]);
        assert_eq!(
            consumer.get("fetch.wait.max.ms"),
            Some("10"),
            "the user's value wins"
        );
        assert_eq!(consumer.get("batch.num.messages"), None);
        assert_eq!(consumer.get("group.id"), Some("g"));
        let admin = settings.client(Role::Admin);
        assert_eq!(admin.get("client.id"), Some("saga"));
        assert_eq!(admin.get("batch.num.messages"), None);
    }

    #[test]
    fn properties_the_promises_rest_on_are_refused_with_the_reason() {
        for key in [
            "enable.idempotence",
            "producer.acks",
            "consumer.enable.auto.offset.store",
            "message.timeout.ms",
            "bootstrap.servers",
        ] {
            let err = parse(&format!("{key}=x")).unwrap_err();
            assert!(err.contains("cannot be overridden"), "{key}: {err}");
        }
    }

    #[test]
    fn malformed_properties_are_refused() {
        assert!(parse("no-equals-sign").is_err());
        assert!(parse("=value").is_err());
        assert!(parse("producer.=1").is_err());
        assert!(parse("bad key=1").is_err());
        assert_eq!(parse(" linger.ms = 5").unwrap().value, "5");
    }

    #[test]
    fn secrets_are_hidden_when_settings_are_logged() {
        let p = parse("sasl.password=hunter2").unwrap();
        assert_eq!(p.to_string(), "sasl.password=***");
        let p = parse("producer.linger.ms=5").unwrap();
        assert_eq!(p.to_string(), "producer.linger.ms=5");
    }
}
