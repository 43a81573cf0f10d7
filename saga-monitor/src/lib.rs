//! saga-monitor: the read side. It projects every saga topic (the event topics, every consumer
//! group's retry topics and dead-letter queue) into per-saga timelines and summaries in its own
//! database, with the partitions' offsets as checkpoints in the same transaction as the rows
//! ([`projection`]), and serves them ([`http`]). It produces nothing and writes no database but
//! its own.
//!
//! - [`step`]: a record as one step of its saga (pure).
//! - [`timeline`]: a saga's steps in causal order (pure).
//! - [`summary`]: a saga's status, outcome and what it waits for (pure).
//! - [`store`]: the projection's tables.
//! - [`pages`]: the pages (`/ui`), rendered here: no front-end build.
//! - [`rebuild`] and [`snapshot`]: the projection built again from the log without downtime,
//!   from the newest snapshot of its version.

pub mod http;
pub mod pages;
pub mod projection;
pub mod rebuild;
pub mod snapshot;
pub mod step;
pub mod store;
pub mod summary;
pub mod timeline;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use messaging::kafka::KafkaSettings;
use service_kit::http::Readiness;
use service_kit::http_server::{HttpLimits, ListenAddr};
use service_kit::shutdown::Shutdown;

use crate::summary::{Allowances, Outcome, Waiting};

/// The version of what the projection stores: raise it whenever [`step`], [`summary`] or the
/// tables change what a record becomes, so that a rebuild ignores snapshots taken by other code.
/// 2: a saga keeps at most [`store::MAX_STEPS_PER_SAGA`] steps.
pub const PROJECTION_VERSION: i32 = 2;

/// The projection's tables.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// saga-monitor settings: flags or environment variables; defaults fit the local stack.
#[derive(Debug, Clone, Parser)]
#[command(name = "saga-monitor", version, about)]
pub struct Settings {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Address the API and pages listen on (HOST:PORT), or `stdin` (a listening socket as
    /// standard input).
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8085")]
    pub listen_addr: ListenAddr,
    /// The monitor's own database (created if missing).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/monitor"
    )]
    pub database_url: String,
    /// Most database connections.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 10)]
    pub db_max_connections: u32,
    #[command(flatten)]
    pub kafka: KafkaSettings,
    /// How long a saga may wait for its reservation (PENDING) before it shows as stuck.
    #[arg(long, env = "RESERVATION_ALLOWANCE", default_value = "10s", value_parser = service_kit::duration::parse)]
    pub reservation_allowance: Duration,
    /// How long a saga may wait for its payment (AWAITING_PAYMENT) before it shows as stuck.
    #[arg(long, env = "PAYMENT_ALLOWANCE", default_value = "30s", value_parser = service_kit::duration::parse)]
    pub payment_allowance: Duration,
    /// How long a saga may wait for its refund (REFUNDING) before it shows as stuck.
    #[arg(long, env = "REFUND_ALLOWANCE", default_value = "60s", value_parser = service_kit::duration::parse)]
    pub refund_allowance: Duration,
    /// How long a saga may wait for its stock's release (CANCELLING) before it shows as stuck.
    #[arg(long, env = "RELEASE_ALLOWANCE", default_value = "10s", value_parser = service_kit::duration::parse)]
    pub release_allowance: Duration,
    /// How long a saga that ended is kept (with its steps); one that never ended is kept four
    /// times as long.
    #[arg(long, env = "SAGA_RETENTION", default_value = "7d", value_parser = service_kit::duration::parse)]
    pub saga_retention: Duration,
    /// The link from a saga's page to a trace, with `{trace_id}` where the trace id goes, such
    /// as Jaeger's `http://localhost:16686/trace/{trace_id}`. None: trace ids are shown unlinked.
    #[arg(long, env = "TRACE_URL_TEMPLATE", value_parser = parse_trace_url_template)]
    pub trace_url_template: Option<String>,
    /// How often the serving monitor takes a snapshot of its projection (0: never; `saga-monitor
    /// snapshot` takes one at any time). Each is a copy of every step: keep it rare on a big
    /// projection.
    #[arg(long, env = "SNAPSHOT_EVERY", default_value = "24h", value_parser = service_kit::duration::parse)]
    pub snapshot_every: Duration,
    /// The most records one transaction projects.
    #[arg(long, env = "MAX_BATCH", default_value_t = 500,
          value_parser = clap::value_parser!(u16).range(1..=5000))]
    pub max_batch: u16,
    /// How long a batch of the live projection waits, after its first record, for more records
    /// to join it: the most the monitor trails the saga by when all is well. Records arriving
    /// one at a time are each a transaction of five statements without it; at 100 sagas/s,
    /// 100 ms took the monitor's Postgres statements from about 6 per saga to about 1 (`scripts/bench.sh`).
    #[arg(long, env = "BATCH_LINGER", default_value = "100ms", value_parser = service_kit::duration::parse)]
    pub batch_linger: Duration,
    #[command(flatten)]
    pub http: HttpLimits,
}

/// What the process does; without a command it serves.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Project the topics and serve the API and pages (the default).
    Serve,
    /// Build the projection again from the newest snapshot of this version (or from the start of
    /// the topics) beside the live one, and swap it in once caught up; resumable, one at a time.
    Rebuild,
    /// Take a snapshot of the live projection now.
    Snapshot,
}

impl Settings {
    pub fn allowances(&self) -> Allowances {
        Allowances {
            reservation: self.reservation_allowance,
            payment: self.payment_allowance,
            refund: self.refund_allowance,
            release: self.release_allowance,
        }
    }
}

fn parse_trace_url_template(text: &str) -> Result<String, String> {
    if !(text.starts_with("http://") || text.starts_with("https://")) {
        return Err("a trace URL template must start with http:// or https://".into());
    }
    if !text.contains("{trace_id}") {
        return Err("a trace URL template must contain {trace_id}".into());
    }
    if text
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '<' || c == '>')
    {
        return Err(
            "a trace URL template must not contain spaces, quotes or angle brackets".into(),
        );
    }
    Ok(text.to_owned())
}

/// How often the saga counts (`monitor_sagas`, `monitor_stuck_sagas`) are refreshed.
const COUNT_EVERY: Duration = Duration::from_secs(10);
/// How often ended sagas past their retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(300);

/// Runs the command the settings name: serves until `signals` fires, or rebuilds, or takes a
/// snapshot.
pub async fn run(settings: Settings, signals: Shutdown) -> anyhow::Result<()> {
    match settings.command {
        None | Some(Command::Serve) => serve(settings, signals).await,
        Some(Command::Rebuild) => {
            let pool = connect(&settings).await?;
            rebuild::run(
                pool.clone(),
                settings.kafka.clone(),
                usize::from(settings.max_batch),
                signals,
            )
            .await?;
            pool.close().await;
            Ok(())
        }
        Some(Command::Snapshot) => {
            let pool = connect(&settings).await?;
            snapshot::take(&pool).await?;
            pool.close().await;
            Ok(())
        }
    }
}

async fn connect(settings: &Settings) -> anyhow::Result<sqlx::PgPool> {
    anyhow::ensure!(
        settings.db_max_connections > 1,
        "--db-max-connections must be at least 2"
    );
    tracing::info!(database = %service_kit::db::redacted(&settings.database_url), "connecting to the database and migrating");
    service_kit::db::connect_and_migrate(
        &settings.database_url,
        settings.db_max_connections,
        &[&MIGRATIONS],
    )
    .await
}

/// Serves until `signals` fires.
async fn serve(settings: Settings, signals: Shutdown) -> anyhow::Result<()> {
    settings.http.validate()?;
    // Stops everything on a signal, or when the projection cannot go on (so that a supervisor
    // restarts the process instead of it serving a projection that no longer advances).
    let (stop, shutdown) = Shutdown::new();
    let stop = Arc::new(stop);
    let on_signal = stop.clone();
    tokio::spawn(async move {
        signals.wait().await;
        on_signal.fire();
    });
    let allowances = Arc::new(settings.allowances());
    let metrics = service_kit::telemetry::init_metrics(&[], http::describe_metrics)?;
    for outcome in Outcome::ALL {
        metrics::gauge!("monitor_sagas", "outcome" => outcome.as_str()).set(0.0);
    }
    for step in Waiting::ALL {
        metrics::gauge!("monitor_stuck_sagas", "step" => step.as_str()).set(0.0);
    }
    for kind in ["event", "retry", "dead_letter"] {
        metrics::counter!("monitor_steps_projected_total", "kind" => kind).absolute(0);
    }
    metrics::counter!("monitor_write_failures_total").absolute(0);
    metrics::counter!("monitor_steps_left_out_total").absolute(0);
    for topic in schemas::EVENT_TOPICS {
        metrics::counter!("monitor_records_unattributed_total", "topic" => topic).absolute(0);
        metrics::counter!("monitor_offset_gaps_total", "topic" => topic).absolute(0);
    }
    let listener = settings.listen_addr.listen().await?;
    let pool = connect(&settings).await?;
    let readiness = Readiness::default();
    let state = http::AppState {
        pool: pool.clone(),
        allowances: allowances.clone(),
        trace_url_template: settings.trace_url_template.as_deref().map(Into::into),
    };
    let app = http::routes(state.clone())
        .merge(pages::routes(state))
        .merge(service_kit::http::ops_routes(readiness.clone(), metrics))
        .layer(axum::middleware::from_fn(service_kit::http::track_requests));
    tracing::info!(
        allowances = ?*allowances,
        "saga-monitor listening on http://{}",
        listener.local_addr()?
    );
    let server = tokio::spawn(service_kit::http_server::serve(
        listener,
        app,
        settings.http.clone(),
        shutdown.clone(),
    ));
    let projection = tokio::spawn(projection::run(
        pool.clone(),
        settings.kafka.clone(),
        projection::Target {
            schema: store::LIVE.to_owned(),
            max_batch: usize::from(settings.max_batch),
            summarize: true,
            linger: settings.batch_linger,
        },
        shutdown.clone(),
    ));
    let housekeeping = tokio::spawn(housekeeping(
        pool.clone(),
        allowances,
        settings.saga_retention,
        settings.snapshot_every,
        shutdown.clone(),
    ));
    readiness.set_ready();
    let projected = projection.await?;
    if let Err(e) = &projected {
        tracing::error!(error = %format!("{e:#}"), "the projection stopped; stopping the monitor");
    }
    stop.fire();
    server.await??;
    housekeeping.await?;
    pool.close().await;
    projected?;
    tracing::info!("saga-monitor stopped");
    Ok(())
}

/// Refreshes the saga counts and deletes sagas past their retention, until `shutdown`.
async fn housekeeping(
    pool: sqlx::PgPool,
    allowances: Arc<Allowances>,
    retention: Duration,
    snapshot_every: Duration,
    shutdown: Shutdown,
) {
    let mut last_prune: Option<std::time::Instant> = None;
    let mut last_snapshot = std::time::Instant::now();
    loop {
        match rebuild::progress(&pool).await {
            Ok(behind) => {
                metrics::gauge!("monitor_rebuild_running").set(if behind.is_some() {
                    1.0
                } else {
                    0.0
                });
                metrics::gauge!("monitor_rebuild_behind_records").set(behind.unwrap_or(0) as f64);
            }
            Err(e) => tracing::warn!(error = %e, "reading a rebuild's progress failed"),
        }
        if !snapshot_every.is_zero() && last_snapshot.elapsed() >= snapshot_every {
            if let Err(e) = snapshot::take(&pool).await {
                tracing::warn!(error = %format!("{e:#}"), "taking the periodic snapshot failed; trying again at the next one");
            }
            last_snapshot = std::time::Instant::now();
        }
        match store::counts(&pool, &allowances).await {
            Ok((outcomes, stuck)) => {
                for outcome in Outcome::ALL {
                    let n = outcomes.get(&outcome).copied().unwrap_or(0);
                    metrics::gauge!("monitor_sagas", "outcome" => outcome.as_str()).set(n as f64);
                }
                for step in Waiting::ALL {
                    let n = stuck.get(&step).copied().unwrap_or(0);
                    metrics::gauge!("monitor_stuck_sagas", "step" => step.as_str()).set(n as f64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "counting the sagas failed"),
        }
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            let now = chrono::Utc::now();
            let ended =
                now - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
            let started =
                now - chrono::Duration::from_std(retention * 4).unwrap_or(chrono::Duration::MAX);
            match store::prune(&pool, ended, started).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(sagas = n, "deleted sagas past their retention"),
                Err(e) => tracing::warn!(error = %e, "deleting old sagas failed"),
            }
            last_prune = Some(std::time::Instant::now());
        }
        if shutdown.sleep(COUNT_EVERY).await.is_err() {
            return;
        }
    }
}
