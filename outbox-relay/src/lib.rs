//! outbox-relay: a separate process that tails the `outbox` table of each configured source
//! database and publishes every row to Kafka (topic by aggregate type, key = order id, the saga's
//! headers), deleting a row only after the broker acknowledged it.
//!
//! # Tailing design, and why
//!
//! **No cursor that could skip a row.** An idle relay reads the oldest rows still in the table
//! (`ORDER BY id LIMIT n`); published rows are deleted, so the table holds exactly the
//! unpublished ones. A relay that remembered "the highest id published so far" would skip a row
//! whose transaction took its id early but committed late (the late-commit problem: ids are
//! handed out at insert, rows become visible at commit). While earlier rows are still being
//! acknowledged, the relay reads ahead with a cursor that remembers every id it has not seen
//! below its position (a *hole*) and asks for those again, so a late commit is still found by the
//! first read that can see it (see [`pipeline`]). The cost is a delete per row, batched into one
//! statement for everything acknowledged since the last one.
//!
//! **Per-order order.** Every transaction that changes an order locks that order's row (orders) or
//! its reservation and stock rows (inventory) before appending to the outbox, so two outbox rows
//! of one order are inserted by transactions that run one after the other: for one order, id order
//! is commit order. Rows are produced strictly in id order to a partition chosen by key, by an
//! idempotent producer (`enable.idempotence`, `acks=all`) that keeps that order across its own
//! retries, and with `message.timeout.ms=0` it never gives up on a row during a broker outage, so
//! no later row of the same order can overtake one that failed.
//!
//! **Throughput.** Reads start at 16 rows and double while each read comes back full (a
//! backlog), up to `--batch-size` (5,000); the relay reads on while up to `--max-rows-in-flight`
//! (10,000) rows of a source are with the producer, and deletes what has been acknowledged in
//! one statement per round. So the producer is never left idle waiting for a delete or a read.
//! Per row the relay does little besides the producer's own work: its metrics are registered
//! once per source, its send span is made only when spans are exported (and then with
//! OpenTelemetry directly, not through the log layer), and the backlog gauges do not scan the
//! table every second (see `relay::Backlog`). Where its time went before, measured with
//! `perf`, is in the README ("The relay at the ceiling").
//!
//! **Waking up quickly without NOTIFY.** `pg_notify` in the writers' transactions would take a
//! cluster-wide lock at commit and serialize every committing writer. Instead the relay polls
//! with an index probe (`SELECT ... ORDER BY id LIMIT n` on a table that is usually empty): every
//! `--active-poll-ms` (2 ms) while rows flow, backing off to every `--idle-poll-ms` (250 ms) when
//! no source has had a row for a few seconds (the interval is a twentieth of the time since the
//! last row). One row from either source tightens both: a saga bounces between the two outboxes,
//! so the second hop never waits for the idle interval. Logical decoding would avoid polling
//! entirely but needs a replication slot per source and its own operations story; polling keeps
//! the relay a plain SQL client.
//!
//! **Crash safety.** A row is deleted only after its delivery report says the broker has it, so a
//! crash (even `kill -9`) between produce and delete republishes rows: at-least-once, and the
//! consumers' inboxes make the duplicates harmless. **One relay per source**: a session advisory
//! lock makes a second relay instance wait as a standby instead of publishing the same rows.

pub mod outbox;
pub mod pipeline;
pub mod relay;

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use service_kit::http::Readiness;
use service_kit::shutdown::Shutdown;

/// One outbox to tail: `NAME=DATABASE_URL`.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub database_url: String,
}

impl FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, url) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=DATABASE_URL, got {s:?}"))?;
        if name.is_empty() || url.is_empty() {
            return Err(format!("expected NAME=DATABASE_URL, got {s:?}"));
        }
        Ok(Source {
            name: name.to_owned(),
            database_url: url.to_owned(),
        })
    }
}

/// outbox-relay settings: flags or environment variables; defaults fit the local stack.
#[derive(Debug, Clone, Parser)]
#[command(name = "outbox-relay", version, about)]
pub struct Settings {
    /// Outboxes to tail, as NAME=DATABASE_URL (repeat the flag, or comma-separate in the variable).
    #[arg(
        long = "source",
        env = "RELAY_SOURCES",
        value_delimiter = ',',
        default_value = "orders=postgres://postgres@127.0.0.1:5432/orders,inventory=postgres://postgres@127.0.0.1:5432/inventory,payments=postgres://postgres@127.0.0.1:5432/payments"
    )]
    pub sources: Vec<Source>,
    #[command(flatten)]
    pub kafka: messaging::kafka::KafkaSettings,
    /// Most rows per read of an outbox. Reads start small and double while there is a backlog,
    /// up to this.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 5000)]
    pub batch_size: i64,
    /// Most rows per source handed to the Kafka client and not yet acknowledged: the relay reads
    /// on while earlier rows are being acknowledged, up to this many. With batching on, a drain
    /// is bound by how many rows wait for their acknowledgement at once: 2,000 (with reads of
    /// 2,000) drained at 0.48 of the batched produce ceiling, 10,000 (with reads of 5,000) at
    /// 0.53-0.73 (medians of three), with the relay under 50 MiB (`scripts/bench.sh`).
    #[arg(long, env = "RELAY_MAX_ROWS_IN_FLIGHT", default_value_t = 10000)]
    pub max_rows_in_flight: usize,
    /// How often a source is read while rows are flowing, in milliseconds.
    #[arg(long, env = "RELAY_ACTIVE_POLL_MS", default_value_t = 2)]
    pub active_poll_ms: u64,
    /// How often a source is read once the relay has been idle for a few seconds, in
    /// milliseconds: the longest a first row after a quiet spell waits. Each poll is a query on
    /// each source: at 100 ms the polls were 0.9% of a core of an idle stack's 2.3% (the relay
    /// and its Postgres backends); at 250 ms the idle stack takes 1.9%, at 1,000 ms 1.6%.
    #[arg(long, env = "RELAY_IDLE_POLL_MS", default_value_t = 250)]
    pub idle_poll_ms: u64,
    /// Address of /metrics, /healthz and /readyz (HOST:PORT), or `stdin`: a listening socket
    /// given as standard input (inetd, systemd `StandardInput=socket`).
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:8082")]
    pub metrics_addr: service_kit::http_server::ListenAddr,
    /// Partitions of the topics the relay creates when they are missing.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 3)]
    pub topic_partitions: i32,
    #[command(flatten)]
    pub http: service_kit::http_server::HttpLimits,
    #[command(flatten)]
    pub retention: messaging::retention::TopicRetention,
}

/// Runs the relay until `shutdown` fires.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    let metrics = service_kit::telemetry::init_metrics(
        &[
            ("relay_commit_to_ack_seconds", &relay::COMMIT_TO_ACK_BUCKETS),
            ("relay_batch_size", &relay::BATCH_SIZE_BUCKETS),
        ],
        relay::describe_metrics,
    )?;
    let readiness = Readiness::default();
    let listener = settings.metrics_addr.listen().await?;
    tracing::info!(
        "outbox-relay metrics on http://{}/metrics",
        listener.local_addr()?
    );
    let app = service_kit::http::ops_routes(readiness.clone(), metrics);
    let server = tokio::spawn(service_kit::http_server::serve(
        listener,
        app,
        settings.http.clone(),
        shutdown.clone(),
    ));
    let topics = settings.retention.event_topics();
    tokio::select! {
        _ = messaging::kafka::ensure_topics_with_retry(
            &settings.kafka,
            &topics,
            settings.topic_partitions,
        ) => {}
        _ = shutdown.wait() => {}
    }
    tracing::info!(kafka_config = ?settings.kafka.describe_user_config(), "connecting to Kafka");
    let producer = relay::producer(&settings.kafka)?;
    relay::warm_up(&producer, &shutdown).await;
    let options = relay::Options {
        max_batch: settings.batch_size,
        max_in_flight: settings.max_rows_in_flight,
        active_poll: Duration::from_millis(settings.active_poll_ms),
        idle_poll: Duration::from_millis(settings.idle_poll_ms),
    };
    let activity = std::sync::Arc::new(relay::Activity::default());
    let mut tasks = Vec::new();
    for source in settings.sources {
        tracing::info!(source = %source.name, "tailing outbox");
        // Errors are rare: export the series at 0 from the start so that rates and alerts on
        // them have something to read.
        for reason in ["unknown_aggregate", "enqueue", "delivery"] {
            metrics::counter!("relay_publish_errors_total", "source" => source.name.clone(), "reason" => reason)
                .absolute(0);
        }
        tasks.push(tokio::spawn(relay::tail(
            source,
            producer.clone(),
            options.clone(),
            activity.clone(),
            shutdown.clone(),
        )));
    }
    readiness.set_ready();
    // The first fatal error ends the process (the others' rows stay in their outboxes).
    futures::future::try_join_all(
        tasks
            .into_iter()
            .map(|task| async move { task.await.context("relay task")? }),
    )
    .await?;
    server.await.context("metrics server")??;
    tracing::info!("outbox-relay stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_defaults_parse_and_the_flags_are_unique() {
        Settings::command().debug_assert();
        let settings = Settings::try_parse_from(["outbox-relay"]).expect("defaults");
        assert_eq!(settings.batch_size, 5000);
        assert_eq!(settings.max_rows_in_flight, 10_000);
        assert_eq!(settings.idle_poll_ms, 250);
        assert_eq!(settings.sources.len(), 3);
    }
}
