//! order-service: places orders over HTTP (order row, read-model row and OrderPlaced outbox row in
//! one transaction) and reacts to inventory and payment events: it asks for the payment once the
//! stock is reserved, confirms the order once it is paid, and runs the compensations in reverse
//! order (refund, then stock) when it is cancelled or a step times out.

pub mod consumer;
pub mod deadline;
pub mod domain;
pub mod http;
pub mod store;
pub mod transition;

use clap::Parser;
use messaging::service::{CommonSettings, ServiceConfig, ServiceMetrics, ServiceSpec};
use service_kit::http_server::ListenAddr;
use service_kit::jobs::Runner;
use service_kit::pruning::{Keep, PrunedTable};
use service_kit::shutdown::Shutdown;
use transition::Steps;

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// order-service settings: flags or environment variables; defaults fit the local stack.
#[derive(Debug, Clone, Parser)]
#[command(name = "order-service", version, about)]
pub struct Settings {
    /// Address the HTTP API listens on (HOST:PORT), or `stdin`: a listening socket given as
    /// standard input (inetd, systemd `StandardInput=socket`).
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen_addr: ListenAddr,
    /// The orders database (created if missing).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/orders"
    )]
    pub database_url: String,
    /// The reservation step's timeout: an order still PENDING this long after it was placed is
    /// cancelled (DEADLINE_EXCEEDED). `--saga-deadline` is its older name.
    #[arg(long, alias = "saga-deadline", env = "RESERVATION_TIMEOUT", default_value = "30s",
          value_parser = service_kit::duration::parse)]
    pub reservation_timeout: std::time::Duration,
    /// The payment step's timeout: an order still AWAITING_PAYMENT this long after its payment
    /// was asked for is cancelled (PAYMENT_TIMEOUT): it asks for the refund (the charge may be in
    /// flight), then releases the stock.
    #[arg(long, env = "PAYMENT_TIMEOUT", default_value = "30s", value_parser = service_kit::duration::parse)]
    pub payment_timeout: std::time::Duration,
    /// How long an Idempotency-Key is remembered: a request repeated with the same key within
    /// this time gets the first answer; after it, the key is free again.
    #[arg(long, env = "IDEMPOTENCY_KEY_TTL", default_value = "24h", value_parser = service_kit::duration::parse)]
    pub idempotency_key_ttl: std::time::Duration,
    #[command(flatten)]
    pub common: CommonSettings,
}

/// Runs the service until `shutdown` fires.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    let idempotency_key_ttl = settings.idempotency_key_ttl;
    let steps = Steps {
        reservation: settings.reservation_timeout,
        payment: settings.payment_timeout,
    };
    let spec = ServiceSpec {
        name: "order-service",
        migrations: &MIGRATIONS,
        group: consumer::GROUP,
        subscribe: consumer::TOPICS,
        handler: consumer::SagaEvents { steps },
        routes: move |pool| {
            http::routes(http::AppState {
                pool,
                idempotency_key_ttl,
                steps,
            })
        },
        background: vec![Box::new(|pool, shutdown| {
            Box::pin(deadline::measure(pool, shutdown))
        })],
        jobs: [deadline::Step::Reservation, deadline::Step::Payment]
            .into_iter()
            .fold(Runner::default(), |runner, step| {
                runner.with(step.job_kind(), deadline::Timeout { step, steps })
            }),
        pruned: vec![PrunedTable {
            table: "idempotency_keys",
            time_column: "created_at",
            keep: Keep::For(idempotency_key_ttl),
        }],
        metrics: ServiceMetrics {
            describe: || {
                transition::describe_metrics();
                deadline::describe_metrics();
            },
            buckets: &[("saga_duration_seconds", &transition::SAGA_BUCKETS)],
            zero_counters: &[
                ("saga_started_total", &[&[]]),
                (
                    "saga_completed_total",
                    &[
                        &[("outcome", "confirmed")],
                        &[("outcome", "rejected")],
                        &[("outcome", "cancelled")],
                    ],
                ),
                (
                    "saga_failed_total",
                    &[
                        &[("reason", "stock_unavailable")],
                        &[("reason", "deadline_exceeded")],
                        &[("reason", "payment_declined")],
                        &[("reason", "payment_timeout")],
                    ],
                ),
                (
                    "saga_compensations_total",
                    &[&[("step", "payment")], &[("step", "inventory")]],
                ),
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
