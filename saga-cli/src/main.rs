//! `saga`, the operators' tool for the saga's topics:
//!
//! - `saga tail TOPIC` prints a topic's records as JSON lines, decoding our Avro (and JSON) events;
//! - `saga dlq list|show|redrive` reads a consumer group's dead-letter topic and sends selected
//!   records back to their original topic with their ORIGINAL message id, so the group's inbox
//!   still recognises anything that was applied in the meantime;
//! - `saga audit` checks the topics and both databases against the saga's promises (see
//!   [`audit`]); exit status 0 when it finds nothing, 1 when it finds something, 2 when it could
//!   not read what it needs.
//!
//! Output goes to stdout as JSON; what the tool is doing goes to stderr.

mod audit;

use schemas::headers;
use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use rdkafka::producer::FutureProducer;
use serde_json::{Value, json};

use messaging::delivery::Delivery;
use messaging::kafka::KafkaSettings;
use messaging::reader::{End, Until, read_all, read_topic};

/// The name the tool's reads give the broker (nothing is ever committed for it).
const GROUP: &str = "saga-cli";

#[derive(Debug, Parser)]
#[command(
    name = "saga",
    version,
    about = "Decode the saga's topics; list, show and redrive dead letters; audit the saga"
)]
struct Cli {
    #[command(flatten)]
    kafka: messaging::kafka::KafkaSettings,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a topic's records as JSON lines (from the beginning; `--follow` keeps reading).
    Tail {
        topic: String,
        /// Keep reading new records until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// Dead letters of a consumer group.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Check the topics and both databases against the saga's promises: records never applied
    /// nor dead-lettered, orders not terminal, statuses that disagree with reservations, stock
    /// not conserved, events out of order, old outbox rows. Exit status 1 when it finds any,
    /// 2 when it cannot read what it needs.
    Audit(audit::AuditArgs),
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// One JSON line per dead letter: where it came from, what it is and why it failed.
    List(Group),
    /// Every dead letter with this message id, in full, with its event decoded.
    Show {
        #[command(flatten)]
        group: Group,
        message_id: String,
    },
    /// Send dead letters back to their original topic, keeping key, value and original headers
    /// (so the message id, and the inbox's dedupe, are unchanged).
    Redrive {
        #[command(flatten)]
        group: Group,
        #[command(flatten)]
        select: Selection,
        /// Only print what would be redriven.
        #[arg(long)]
        dry_run: bool,
        /// At most this many records per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
    },
}

#[derive(Debug, Args)]
struct Group {
    /// The consumer group whose dead letters to read (`<group>.dlq`).
    #[arg(long, short)]
    group: String,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct Selection {
    /// Redrive the records with these message ids.
    #[arg(long = "message-id", num_args = 1..)]
    message_ids: Vec<String>,
    /// Redrive the records of this event type.
    #[arg(long)]
    event_type: Option<String>,
    /// Redrive every record.
    #[arg(long)]
    all: bool,
}

impl Selection {
    fn matches(&self, record: &Delivery) -> bool {
        if self.all {
            return true;
        }
        if let Some(event_type) = &self.event_type {
            return record.header(headers::EVENT_TYPE) == Some(event_type.as_str());
        }
        record
            .header(headers::MESSAGE_ID)
            .is_some_and(|id| self.message_ids.iter().any(|m| m == id))
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(status) => std::process::ExitCode::from(status as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Runs the command; returns the exit status.
async fn run(cli: Cli) -> anyhow::Result<i32> {
    let kafka = &cli.kafka;
    let done: anyhow::Result<()> = match cli.command {
        Command::Audit(args) => return audit::run(kafka, &args).await,
        Command::Tail { topic, follow } => {
            let until = if follow {
                Until::Follow
            } else {
                Until::End(End::QUIET)
            };
            read_topic(kafka, GROUP, &topic, until, |record| {
                println!("{}", record_json(&record));
            })
        }
        Command::Dlq(DlqCommand::List(group)) => {
            for record in dead_letters(kafka, &group.group).await? {
                println!("{}", summary_json(&record));
            }
            Ok(())
        }
        Command::Dlq(DlqCommand::Show { group, message_id }) => {
            let found: Vec<Delivery> = dead_letters(kafka, &group.group)
                .await?
                .into_iter()
                .filter(|r| r.header(headers::MESSAGE_ID) == Some(message_id.as_str()))
                .collect();
            if found.is_empty() {
                bail!(
                    "no dead letter with message id {message_id} in {}.dlq",
                    group.group
                );
            }
            for record in found {
                println!("{}", serde_json::to_string_pretty(&record_json(&record))?);
            }
            Ok(())
        }
        Command::Dlq(DlqCommand::Redrive {
            group,
            select,
            dry_run,
            rate,
        }) => redrive(kafka, &group.group, &select, dry_run, rate).await,
    };
    done.map(|()| 0)
}

async fn dead_letters(kafka: &KafkaSettings, group: &str) -> anyhow::Result<Vec<Delivery>> {
    let topic = messaging::kafka::dead_letter_topic(group);
    read_all(kafka, GROUP, &topic, End::QUIET)
}

async fn redrive(
    kafka: &KafkaSettings,
    group: &str,
    select: &Selection,
    dry_run: bool,
    rate: f64,
) -> anyhow::Result<()> {
    if rate <= 0.0 {
        bail!("--rate must be positive");
    }
    let letters = dead_letters(kafka, group).await?;
    let mut seen = HashSet::new();
    // A message dead-lettered more than once is redriven once.
    let selected: Vec<&Delivery> = letters
        .iter()
        .filter(|r| select.matches(r))
        .filter(|r| seen.insert(r.header(headers::MESSAGE_ID).unwrap_or_default().to_owned()))
        .collect();
    eprintln!(
        "{} of {} dead letters in {group}.dlq selected{}",
        selected.len(),
        letters.len(),
        if dry_run {
            " (dry run: nothing is sent)"
        } else {
            ""
        }
    );
    let producer: FutureProducer = kafka
        .producer()
        .create()
        .context("creating Kafka producer")?;
    let pause = Duration::from_secs_f64(1.0 / rate);
    for record in selected {
        let Some(topic) = record
            .header(headers::DLQ_ORIGINAL_TOPIC)
            .map(str::to_owned)
        else {
            eprintln!(
                "skipping offset {}: no dlq-original-topic header",
                record.offset
            );
            continue;
        };
        if record.header(headers::DLQ_STUB) == Some("true") {
            eprintln!(
                "skipping offset {}: a stub of a record too large to copy, without its value (read it at {topic} partition {} offset {})",
                record.offset,
                record
                    .header(headers::DLQ_ORIGINAL_PARTITION)
                    .unwrap_or("?"),
                record.header(headers::DLQ_ORIGINAL_OFFSET).unwrap_or("?"),
            );
            continue;
        }
        let line = json!({
            "action": if dry_run { "would redrive" } else { "redriven" },
            "message_id": record.header(headers::MESSAGE_ID),
            "event_type": record.header(headers::EVENT_TYPE),
            "to": topic,
            "dlq_offset": record.offset,
        });
        if !dry_run {
            let headers = record.headers_with(&[headers::DLQ_PREFIX], &[]);
            record
                .send_copy(&producer, &topic, headers)
                .await
                .with_context(|| format!("producing to {topic}"))?;
            tokio::time::sleep(pause).await;
        }
        println!("{line}");
    }
    Ok(())
}

fn summary_json(record: &Delivery) -> Value {
    json!({
        "dlq_offset": record.offset,
        "message_id": record.header(headers::MESSAGE_ID),
        "event_type": record.header(headers::EVENT_TYPE),
        "key": key_text(record),
        "original_topic": record.header(headers::DLQ_ORIGINAL_TOPIC),
        "original_partition": record.header(headers::DLQ_ORIGINAL_PARTITION),
        "original_offset": record.header(headers::DLQ_ORIGINAL_OFFSET),
        "error_class": record.header(headers::DLQ_ERROR_CLASS),
        "error_message": record.header(headers::DLQ_ERROR_MESSAGE),
        "attempts": record.header(headers::DLQ_ATTEMPTS),
        "first_failure_at": record.header(headers::DLQ_FIRST_FAILURE_AT),
        "last_failure_at": record.header(headers::DLQ_LAST_FAILURE_AT),
        "stub": record.header(headers::DLQ_STUB) == Some("true"),
    })
}

fn record_json(record: &Delivery) -> Value {
    let headers: serde_json::Map<String, Value> = record
        .headers
        .iter()
        .map(|(k, v)| {
            let v = v.as_deref().map(String::from_utf8_lossy);
            (
                k.clone(),
                v.map_or(Value::Null, |v| Value::String(v.into_owned())),
            )
        })
        .collect();
    let mut out = json!({
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "key": key_text(record),
        "headers": headers,
    });
    match record.event() {
        Ok(event) => {
            out["event_type"] = json!(event.event_type());
            out["event"] =
                serde_json::from_slice(&schemas::encode_json(&event)).unwrap_or(Value::Null);
        }
        Err(e) => {
            out["decode_error"] = json!(e.to_string());
            out["value_hex"] = json!(hex(record.payload.as_deref().unwrap_or_default()));
        }
    }
    out
}

/// The key as text, bytes that are not UTF-8 replaced; none when the record has no key.
pub(crate) fn key_text(record: &Delivery) -> Option<String> {
    let key = record.key.as_deref()?;
    Some(String::from_utf8_lossy(key).into_owned())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
