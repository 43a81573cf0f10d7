//! The start-up and shutdown sequence both services share: bind HTTP, create and migrate the
//! database, serve the API and the operational routes, create the topics, run the consumer, and
//! report ready; on shutdown, stop taking requests, finish the current message, close the pool.

use anyhow::Context;
use sqlx::PgPool;
use sqlx::migrate::Migrator;

use crate::consumer::{self, ConsumerSettings, Handler};
use crate::kafka;
use service_kit::http::Readiness;
use service_kit::shutdown::Shutdown;

/// What a service is: its name, migrations, consumer group, subscription and routes.
pub struct ServiceSpec<H, R> {
    pub name: &'static str,
    pub migrations: &'static Migrator,
    pub group: &'static str,
    /// The topics the service consumes (in one consumer group).
    pub subscribe: &'static [&'static str],
    pub handler: H,
    /// Builds the service's API routes from its database pool.
    pub routes: R,
    /// Background work started once the database is ready (for example the saga deadline
    /// check); each runs until shutdown.
    pub background: Vec<Background>,
    /// The service's jobs ([`service_kit::jobs`]): what runs outside the consumer's transaction, or
    /// later.
    pub jobs: service_kit::jobs::Runner,
    /// The service's own tables that the retention job prunes (the inbox and the jobs given up
    /// on are always pruned).
    pub pruned: Vec<service_kit::pruning::PrunedTable>,
    /// The service's own metrics.
    pub metrics: ServiceMetrics,
}

/// The metrics a service owns (the kit and the consumer runtime describe theirs).
pub struct ServiceMetrics {
    /// Describes them (help text and unit).
    pub describe: fn(),
    /// Histogram buckets for those that need their own.
    pub buckets: &'static [service_kit::telemetry::Buckets],
    /// Counters the service sets to 0 at start (once the metrics recorder is installed), so that
    /// rates and alerts over rare events have a series to read before the first one happens.
    pub zero_counters: &'static [ZeroCounter],
}

impl ServiceMetrics {
    /// No metrics of the service's own.
    pub const NONE: ServiceMetrics = ServiceMetrics {
        describe: || {},
        buckets: &[],
        zero_counters: &[],
    };
}

/// A counter name and the label sets to export at 0.
pub type ZeroCounter = (
    &'static str,
    &'static [&'static [(&'static str, &'static str)]],
);

/// A background job: given the pool and the shutdown signal, the future to run.
pub type Background = Box<
    dyn FnOnce(PgPool, Shutdown) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send,
>;

/// Settings every service has with the same defaults; each service's own settings struct
/// flattens this in next to its address and database.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonSettings {
    #[command(flatten)]
    pub kafka: kafka::KafkaSettings,
    /// Partitions of the topics this service creates when they are missing.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 3)]
    pub topic_partitions: i32,
    /// Most database connections the HTTP API holds. A flood of requests waits for these (and
    /// is answered 503 with Retry-After when none frees up in 5 s) without touching the
    /// consumers' own connections.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 10)]
    pub db_max_connections: u32,
    /// Most database connections the consumers and background jobs hold (their own pool: the
    /// saga keeps moving, and the deadline does not cancel good orders, however busy the API is).
    #[arg(long, env = "DB_WORKER_CONNECTIONS", default_value_t = 8)]
    pub db_worker_connections: u32,
    #[command(flatten)]
    pub http: service_kit::http_server::HttpLimits,
    #[command(flatten)]
    pub retention: crate::retention::RetentionSettings,
    /// Delays before each retry of a message that is not applicable yet (`ms`, `s` or `m`); after
    /// the last one it is dead-lettered. One retry topic per delay.
    #[arg(long, env = "RETRY_DELAYS", default_value = "1s,10s,60s", value_parser = parse_retry_delays)]
    pub retry_delays: RetryDelays,
    /// How long an order's events may wait behind one message in the retry topics before that
    /// message is given up on: dead-lettered (class `retryable`) from the copy kept in the
    /// database, and the order's waiting events applied. Guards against a retry copy that never
    /// comes back (its retry topic dropped from --retry-delays, or expired). Must be longer than
    /// the sum of the retry delays.
    #[arg(long, env = "PARKED_KEY_TIMEOUT", default_value = "30m", value_parser = service_kit::duration::parse)]
    pub parked_key_timeout: std::time::Duration,
    /// The most records of the subscribed topic one transaction applies (group commit). Only
    /// records already fetched are grouped, so a quiet consumer applies each at once; 1 applies
    /// every record in its own transaction.
    #[arg(long, env = "CONSUMER_MAX_BATCH", default_value_t = 100,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub consumer_max_batch: u16,
}

impl CommonSettings {
    /// Checks what the flags cannot check one by one.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.http.validate()?;
        anyhow::ensure!(
            self.db_max_connections > 0 && self.db_worker_connections > 0,
            "--db-max-connections and --db-worker-connections must be at least 1"
        );
        let retries: std::time::Duration = self.retry_delays.0.iter().sum();
        let longest = self
            .retry_delays
            .0
            .iter()
            .max()
            .copied()
            .unwrap_or_default();
        let retry_retention = self.retention.retry_topic_retention;
        anyhow::ensure!(
            retry_retention >= longest.saturating_mul(10)
                && retry_retention > self.parked_key_timeout,
            "--retry-topic-retention ({retry_retention:?}) must be at least ten times the longest retry delay \
             ({longest:?}) and longer than --parked-key-timeout ({:?}), or retry copies could expire while they wait",
            self.parked_key_timeout
        );
        anyhow::ensure!(
            self.parked_key_timeout > retries,
            "--parked-key-timeout ({:?}) must be longer than the retry delays together ({retries:?}), \
             or heads still retrying would be given up on",
            self.parked_key_timeout
        );
        Ok(())
    }
}

/// The delays before each retry attempt.
#[derive(Debug, Clone)]
pub struct RetryDelays(pub Vec<std::time::Duration>);

fn parse_retry_delays(text: &str) -> Result<RetryDelays, String> {
    crate::retry::parse_delays(text).map(RetryDelays)
}

/// Where a service runs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub listen_addr: service_kit::http_server::ListenAddr,
    pub database_url: String,
    pub common: CommonSettings,
}

/// Runs the service until `shutdown` fires.
pub async fn run<H, R>(
    spec: ServiceSpec<H, R>,
    config: ServiceConfig,
    shutdown: Shutdown,
) -> anyhow::Result<()>
where
    H: Handler,
    R: FnOnce(PgPool) -> axum::Router,
{
    let name = spec.name;
    config.common.validate()?;
    let describe = spec.metrics.describe;
    let metrics = service_kit::telemetry::init_metrics(spec.metrics.buckets, || {
        consumer::describe_metrics();
        describe();
    })?;
    for (name, label_sets) in spec.metrics.zero_counters {
        for labels in *label_sets {
            let labels: Vec<metrics::Label> = labels
                .iter()
                .map(|(k, v)| metrics::Label::new(*k, *v))
                .collect();
            metrics::counter!(*name, labels).absolute(0);
        }
    }
    let readiness = Readiness::default();
    let listener = config.listen_addr.listen().await?;
    tracing::info!(database = %service_kit::db::redacted(&config.database_url), "connecting to the database and migrating");
    // Two pools: one for the HTTP API, one for the consumers and background jobs.
    let pool = service_kit::db::connect_and_migrate(
        &config.database_url,
        config.common.db_max_connections,
        &[&crate::MIGRATIONS, spec.migrations],
    )
    .await?;
    let workers =
        service_kit::db::connect(&config.database_url, config.common.db_worker_connections).await?;
    let app = (spec.routes)(pool.clone())
        .merge(service_kit::http::ops_routes(readiness.clone(), metrics))
        .layer(axum::middleware::from_fn(service_kit::http::track_requests));
    tracing::info!("{name} listening on http://{}", listener.local_addr()?);
    let server = tokio::spawn(service_kit::http_server::serve(
        listener,
        app,
        config.common.http.clone(),
        shutdown.clone(),
    ));
    let retention = &config.common.retention;
    let mut topics = retention.topics.event_topics();
    topics.push(kafka::TopicSpec::new(
        kafka::dead_letter_topic(spec.group),
        retention.dlq_retention,
    ));
    topics.extend((1..=config.common.retry_delays.0.len()).map(|n| {
        kafka::TopicSpec::new(
            crate::retry::retry_topic(spec.group, n),
            retention.retry_topic_retention,
        )
    }));
    tracing::info!(topics = ?topics.iter().map(|t| &t.name).collect::<Vec<_>>(), "making sure the topics exist");
    let retentions = tokio::select! {
        retentions = kafka::ensure_topics_with_retry(&config.common.kafka, &topics, config.common.topic_partitions) => retentions,
        _ = shutdown.wait() => Vec::new(),
    };
    // A copy of a message can come back from the subscribed topics, the retry topics and the DLQ.
    let sources: Vec<_> = retentions
        .into_iter()
        .filter(|(t, _)| {
            spec.subscribe.contains(&t.as_str()) || t.starts_with(&format!("{}.", spec.group))
        })
        .collect();
    let window = match crate::retention::inbox_window(retention.inbox_retention, &sources) {
        Ok(window) => Some(window),
        Err(why) => {
            tracing::warn!(%why, "the inbox is not pruned: how long a duplicate can still arrive is not known");
            None
        }
    };
    let mut pruned = vec![service_kit::pruning::PrunedTable {
        table: "inbox",
        time_column: "processed_at",
        keep: service_kit::pruning::Keep::DuplicateWindow,
    }];
    // A job given up on is evidence, kept as long as a dead letter.
    pruned.push(service_kit::pruning::PrunedTable {
        table: "jobs",
        time_column: "failed_at",
        keep: service_kit::pruning::Keep::For(retention.dlq_retention),
    });
    pruned.extend(spec.pruned);
    let mut background: Vec<_> = spec
        .background
        .into_iter()
        .map(|job| tokio::spawn(job(workers.clone(), shutdown.clone())))
        .collect();
    background.push(tokio::spawn(
        spec.jobs.run(workers.clone(), shutdown.clone()),
    ));
    background.push(tokio::spawn(service_kit::pruning::run(
        workers.clone(),
        pruned,
        window,
        shutdown.clone(),
    )));
    let consumer = tokio::spawn(consumer::run(
        ConsumerSettings {
            kafka: config.common.kafka.clone(),
            group: spec.group.to_owned(),
            topics: spec.subscribe.iter().map(|t| (*t).to_owned()).collect(),
            retry_delays: config.common.retry_delays.0.clone(),
            parked_key_timeout: config.common.parked_key_timeout,
            max_batch: config.common.consumer_max_batch.into(),
        },
        workers.clone(),
        spec.handler,
        shutdown.clone(),
    ));
    if !shutdown.is_fired() {
        readiness.set_ready();
        tracing::info!("{name} ready");
    }
    consumer.await.context("consumer task")??;
    for job in background {
        job.await.context("background task")?;
    }
    server.await.context("server task")??;
    pool.close().await;
    workers.close().await;
    tracing::info!("{name} stopped");
    Ok(())
}
