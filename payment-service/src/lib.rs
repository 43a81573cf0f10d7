//! payment-service: one payment per order, charged at the card processor when the order's stock
//! is reserved (OrderAwaitingPayment) and refunded or voided when the order asks for its money
//! back (OrderRefundRequested). The processor is called by jobs outside any consumer's
//! transaction, through a circuit breaker ([`charging`], [`gateway`]); what each event does is
//! decided in [`domain`].

pub mod charging;
pub mod consumer;
pub mod domain;
pub mod gateway;
pub mod http;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use messaging::service::{CommonSettings, ServiceConfig, ServiceMetrics, ServiceSpec};
use service_kit::breaker::Breaker;
use service_kit::http_server::ListenAddr;
use service_kit::jobs::Runner;
use service_kit::outbound::{Client, Timeouts};
use service_kit::shutdown::Shutdown;

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How often the payments in flight are counted.
const MEASURE_EVERY: Duration = Duration::from_secs(5);

/// A charge request may be in flight for the request timeout and this much more (the time the
/// request's bytes may take to reach the processor after the client gave up).
const IN_FLIGHT_MARGIN: Duration = Duration::from_secs(2);

/// payment-service settings: flags or environment variables; defaults fit the local stack.
#[derive(Debug, Clone, Parser)]
#[command(name = "payment-service", version, about)]
pub struct Settings {
    /// Address the HTTP API listens on (HOST:PORT), or `stdin`: a listening socket given as
    /// standard input (inetd, systemd `StandardInput=socket`).
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8083")]
    pub listen_addr: ListenAddr,
    /// The payments database (created if missing).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/payments"
    )]
    pub database_url: String,
    /// The card processor's API (payment-gateway locally). Logged with any password in it
    /// replaced by `***`.
    #[arg(long, env = "GATEWAY_URL", default_value = "http://127.0.0.1:8084")]
    pub gateway_url: String,
    /// A file whose first line is the bearer token the processor wants (or set GATEWAY_TOKEN).
    /// Neither: no Authorization header, as the local stand-in expects.
    #[arg(long, env = "GATEWAY_TOKEN_FILE")]
    pub gateway_token_file: Option<std::path::PathBuf>,
    /// The longest a call to the processor may take, its answer included. A charge without an
    /// answer by then is sent again with the same Idempotency-Key.
    #[arg(long, env = "GATEWAY_TIMEOUT", default_value = "5s", value_parser = service_kit::duration::parse)]
    pub gateway_timeout: Duration,
    /// The longest the TCP connection to the processor may take to open.
    #[arg(long, env = "GATEWAY_CONNECT_TIMEOUT", default_value = "1s", value_parser = service_kit::duration::parse)]
    pub gateway_connect_timeout: Duration,
    /// How long after voiding a payment whose charge was sent (the processor's ledger showed no
    /// charge once no request could still be in flight) the ledger is asked once more, so that a
    /// charge recorded later than that is found and refunded.
    #[arg(long, env = "LATE_CHARGE_RECHECK", default_value = "5m", value_parser = service_kit::duration::parse)]
    pub late_charge_recheck: Duration,
    #[command(flatten)]
    pub breaker: BreakerSettings,
    #[command(flatten)]
    pub common: CommonSettings,
}

/// The circuit breaker around the processor (`service_kit::breaker`).
#[derive(Debug, Clone, clap::Args)]
pub struct BreakerSettings {
    /// The share of failed calls in the window that opens the breaker (above 0, at most 1).
    #[arg(long, env = "BREAKER_FAILURE_RATIO", default_value_t = 0.5)]
    pub breaker_failure_ratio: f64,
    /// The fewest calls in the window before the breaker judges the processor.
    #[arg(long, env = "BREAKER_MINIMUM_CALLS", default_value_t = 5)]
    pub breaker_minimum_calls: u32,
    /// How far back the breaker looks.
    #[arg(long, env = "BREAKER_WINDOW", default_value = "10s", value_parser = service_kit::duration::parse)]
    pub breaker_window: Duration,
    /// The first break after the breaker opens; each reopening doubles it, up to
    /// --breaker-max-break.
    #[arg(long, env = "BREAKER_FIRST_BREAK", default_value = "5s", value_parser = service_kit::duration::parse)]
    pub breaker_first_break: Duration,
    #[arg(long, env = "BREAKER_MAX_BREAK", default_value = "60s", value_parser = service_kit::duration::parse)]
    pub breaker_max_break: Duration,
    /// Calls let through at once after a break to see whether the processor is back.
    #[arg(long, env = "BREAKER_PROBES", default_value_t = 2)]
    pub breaker_probes: u32,
}

impl BreakerSettings {
    fn settings(&self) -> service_kit::breaker::Settings {
        service_kit::breaker::Settings {
            failure_ratio: self.breaker_failure_ratio,
            minimum_calls: self.breaker_minimum_calls,
            window: self.breaker_window,
            first_break: self.breaker_first_break,
            max_break: self.breaker_max_break,
            probes: self.breaker_probes,
        }
    }
}

/// The bearer token of the processor, from --gateway-token-file or GATEWAY_TOKEN.
fn gateway_token(file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading --gateway-token-file {}: {e}", path.display()))?,
        None => std::env::var("GATEWAY_TOKEN").unwrap_or_default(),
    };
    let token = text.lines().next().unwrap_or_default().trim().to_owned();
    Ok(Some(token).filter(|t| !t.is_empty()))
}

/// Runs the service until `shutdown` fires.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    anyhow::ensure!(
        !settings.gateway_timeout.is_zero() && settings.gateway_timeout <= Duration::from_secs(20),
        "--gateway-timeout must be above zero and at most 20 s (a job's lease is 30 s)"
    );
    let breaker = Breaker::new(gateway::NAME, settings.breaker.settings())?;
    let timeouts = Timeouts {
        connect: settings.gateway_connect_timeout,
        request: settings.gateway_timeout,
    };
    let mut client = Client::new(gateway::NAME, &settings.gateway_url, timeouts)?;
    let token = gateway_token(settings.gateway_token_file.as_deref())?;
    if let Some(token) = &token {
        client = client.with_bearer_token(token)?;
    }
    tracing::info!(gateway = client.shown_url(), credential = token.is_some(), timeout = ?settings.gateway_timeout,
        breaker = ?settings.breaker, "calling the card processor");
    let runner = Runner::default();
    let wake = runner.wake();
    let payments = Arc::new(charging::Payments {
        gateway: gateway::Gateway::new(client, breaker.clone()),
        in_flight_window: settings.gateway_timeout + IN_FLIGHT_MARGIN,
        wake: wake.clone(),
        late_recheck: settings.late_charge_recheck,
    });
    let spec = ServiceSpec {
        name: "payment-service",
        migrations: &MIGRATIONS,
        group: consumer::GROUP,
        subscribe: &[schemas::ORDERS_TOPIC],
        handler: consumer::OrderEvents { wake },
        routes: http::routes,
        background: vec![Box::new(move |pool, shutdown| {
            Box::pin(measure(pool, breaker, shutdown))
        })],
        jobs: runner
            .with(
                charging::charge_kind(),
                charging::ChargeJob(payments.clone()),
            )
            .with(
                charging::refund_kind(),
                charging::RefundJob(payments.clone()),
            )
            .with(charging::late_kind(), charging::LateChargeJob(payments)),
        // Payments are the business record: kept (db_table_rows shows their size).
        pruned: Vec::new(),
        metrics: ServiceMetrics {
            describe: consumer::describe_metrics,
            buckets: &[],
            zero_counters: &[
                ("payments_requested_total", &[&[]]),
                (
                    "payments_total",
                    &[
                        &[("outcome", "confirmed")],
                        &[("outcome", "declined")],
                        &[("outcome", "refunded")],
                        &[("outcome", "voided")],
                    ],
                ),
                ("payments_late_charges_total", &[&[]]),
            ],
        },
    };
    let config = ServiceConfig {
        listen_addr: settings.listen_addr,
        database_url: settings.database_url,
        common: settings.common,
    };
    messaging::service::run(spec, config, shutdown).await
}

/// Counts the payments in flight, and exports the breaker's state, every [`MEASURE_EVERY`] until
/// shutdown (the breaker was made before the metrics recorder was installed).
async fn measure(pool: sqlx::PgPool, breaker: Breaker, shutdown: Shutdown) {
    loop {
        breaker.publish_state();
        match store::in_flight(&pool).await {
            Ok(rows) => {
                for (state, count, oldest) in rows {
                    metrics::gauge!("payments_in_flight", "state" => state.clone())
                        .set(count as f64);
                    metrics::gauge!("payments_in_flight_oldest_age_seconds", "state" => state)
                        .set(oldest.unwrap_or(0.0));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not count the payments in flight; trying again later")
            }
        }
        if shutdown.sleep(MEASURE_EVERY).await.is_err() {
            return;
        }
    }
}
