//! Retention on the messaging side: how long each topic keeps its records, and how long the
//! inbox must remember a message (the window the table pruning job of `service_kit::pruning`
//! is given).
//!
//! **Topics** are created with an explicit `retention.ms` (and a `segment.ms` no longer than it,
//! so that a record outlives its retention by at most one segment): the event topics
//! `--topic-retention` (7 days), the retry topics `--retry-topic-retention` (7 days, far above
//! their delays), the dead-letter topics `--dlq-retention` (28 days: dead letters are evidence).
//! Topics that already exist are not changed; a different retention is logged at start.
//!
//! **The inbox** must remember a message for as long as a copy of it can still arrive, or a late
//! duplicate would be applied twice. A copy can come from any topic the group reads (its
//! subscribed topic, its retry topics) or from its DLQ (`saga dlq redrive`), for as long as that
//! topic keeps it: at most twice its retention (see above). So the inbox keeps a row for
//! `max(--inbox-retention, 2 × the longest of those retentions)`, from the retentions the broker
//! reports at start. When the broker does not report one (or keeps records for ever), the inbox
//! is not pruned at all, and `db_table_retention_seconds{table="inbox"}` says so with -1.
//! Inventory's `cancelled_orders` (a cancellation seen before its OrderPlaced) keeps the same
//! window: an OrderPlaced can arrive for as long as a duplicate can.

use std::time::Duration;

use crate::kafka::Retention;

/// Settings every service has for its topics and its inbox.
#[derive(Debug, Clone, clap::Args)]
pub struct RetentionSettings {
    #[command(flatten)]
    pub topics: TopicRetention,
    /// How long the retry topics this service creates keep their records.
    #[arg(long, env = "RETRY_TOPIC_RETENTION", default_value = "7d", value_parser = service_kit::duration::parse)]
    pub retry_topic_retention: Duration,
    /// How long the dead-letter topic this service creates keeps its records.
    #[arg(long, env = "DLQ_RETENTION", default_value = "28d", value_parser = service_kit::duration::parse)]
    pub dlq_retention: Duration,
    /// The least time the inbox remembers an applied message; it keeps rows longer when the
    /// topics keep records longer (twice the longest retention of the topics a copy can come
    /// from).
    #[arg(long, env = "INBOX_RETENTION", default_value = "1d", value_parser = service_kit::duration::parse)]
    pub inbox_retention: Duration,
}

/// The event topics' retention, which the relay sets too (whoever creates them first).
#[derive(Debug, Clone, clap::Args)]
pub struct TopicRetention {
    /// How long the event topics (orders.v1, inventory.v1) keep their records when this process
    /// creates them.
    #[arg(long, env = "TOPIC_RETENTION", default_value = "7d", value_parser = service_kit::duration::parse)]
    pub topic_retention: Duration,
}

impl TopicRetention {
    /// The event topics, as a process creates them when they are missing.
    pub fn event_topics(&self) -> Vec<crate::kafka::TopicSpec> {
        schemas::EVENT_TOPICS
            .iter()
            .map(|t| crate::kafka::TopicSpec::new(*t, self.topic_retention))
            .collect()
    }
}

/// How long the inbox must remember a message, given the retention of every topic a copy of it
/// can come from: `max(floor, 2 × the longest)`. `Err` says why it cannot be known (a retention
/// the broker did not report, or records kept for ever): then nothing may be pruned.
pub fn inbox_window(floor: Duration, sources: &[(String, Retention)]) -> Result<Duration, String> {
    let mut longest = Duration::ZERO;
    for (topic, retention) in sources {
        match retention {
            Retention::Millis(ms) => longest = longest.max(Duration::from_millis(*ms)),
            Retention::Forever => return Err(format!("{topic} keeps its records for ever")),
            Retention::Unknown => {
                return Err(format!(
                    "the broker did not report the retention of {topic}"
                ));
            }
        }
    }
    Ok(floor.max(longest.saturating_mul(2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn days(n: u64) -> Duration {
        Duration::from_secs(n * 86_400)
    }

    #[test]
    fn the_inbox_outlives_every_copy_a_topic_can_still_hold() {
        let sources = [
            ("orders.v1".to_owned(), Retention::Millis(7 * 86_400_000)),
            ("g.dlq".to_owned(), Retention::Millis(28 * 86_400_000)),
        ];
        assert_eq!(inbox_window(days(1), &sources), Ok(days(56)));
        assert_eq!(inbox_window(days(90), &sources), Ok(days(90)));
    }

    #[test]
    fn an_unknown_or_endless_retention_turns_pruning_off() {
        let forever = [("g.dlq".to_owned(), Retention::Forever)];
        assert!(
            inbox_window(days(1), &forever)
                .unwrap_err()
                .contains("for ever")
        );
        let unknown = [
            ("orders.v1".to_owned(), Retention::Millis(1)),
            ("g.retry.1".to_owned(), Retention::Unknown),
        ];
        assert!(
            inbox_window(days(1), &unknown)
                .unwrap_err()
                .contains("g.retry.1")
        );
    }
}
