//! payment-gateway: a stand-in card processor for local runs and tests. It charges and refunds
//! with idempotency keys (the same key always gets the same answer, across restarts, and never
//! a second charge), keeps a ledger in its own database, declines by simple rules, and has fault
//! knobs (`PUT /faults`) to play an outage. It is not a payment service: a deployment points
//! payment-service at its real processor instead (see the README).

pub mod faults;
pub mod http;
pub mod ledger;

use std::time::Duration;

use clap::Parser;
use service_kit::http::{AdminToken, Readiness};
use service_kit::http_server::{HttpLimits, ListenAddr};
use service_kit::pruning::{Keep, PrunedTable};
use service_kit::shutdown::Shutdown;
use uuid::Uuid;

/// The ledger's tables.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// payment-gateway settings: flags or environment variables; defaults fit the local stack.
#[derive(Debug, Clone, Parser)]
#[command(name = "payment-gateway", version, about)]
pub struct Settings {
    /// Address the API listens on (HOST:PORT), or `stdin` (a listening socket as standard input).
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8084")]
    pub listen_addr: ListenAddr,
    /// The ledger's database (created if missing).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/gateway"
    )]
    pub database_url: String,
    /// Most database connections.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 10)]
    pub db_max_connections: u32,
    /// A charge above this many cents is declined (decline code `over_limit`).
    #[arg(long, env = "DECLINE_ABOVE_CENTS", default_value_t = 100_000)]
    pub decline_above_cents: i64,
    /// Customers whose charges are declined (decline code `do_not_honor`), comma-separated ids.
    #[arg(long, env = "DECLINE_CUSTOMERS", value_delimiter = ',')]
    pub decline_customers: Vec<Uuid>,
    /// How long charges and refunds stay in the ledger (and their Idempotency-Keys answer as
    /// before): longer than any client keeps retrying a call.
    #[arg(long, env = "LEDGER_RETENTION", default_value = "30d", value_parser = service_kit::duration::parse)]
    pub ledger_retention: Duration,
    /// A file whose first line is the bearer token that `PUT /faults` requires (or set
    /// ADMIN_TOKEN). Neither: the knobs are open, as on the local stack.
    #[arg(long, env = "ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub http: HttpLimits,
}

/// Runs the processor until `shutdown` fires.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    settings.http.validate()?;
    anyhow::ensure!(
        settings.db_max_connections > 0,
        "--db-max-connections must be at least 1"
    );
    anyhow::ensure!(
        settings.decline_above_cents >= 0,
        "--decline-above-cents must not be negative"
    );
    let admin_token = AdminToken::from_env_or_file(settings.admin_token_file.as_deref())?;
    if !admin_token.is_set() {
        tracing::warn!(
            "PUT /faults is open to every client: set ADMIN_TOKEN or --admin-token-file to protect it"
        );
    }
    let metrics = service_kit::telemetry::init_metrics(&[], http::describe_metrics)?;
    for status in ["succeeded", "declined"] {
        metrics::counter!("gateway_charges_total", "status" => status).absolute(0);
    }
    let listener = settings.listen_addr.listen().await?;
    tracing::info!(database = %service_kit::db::redacted(&settings.database_url), "connecting to the database and migrating");
    let pool = service_kit::db::connect_and_migrate(
        &settings.database_url,
        settings.db_max_connections,
        &[&MIGRATIONS],
    )
    .await?;
    let state = http::AppState {
        pool: pool.clone(),
        rules: std::sync::Arc::new(ledger::DeclineRules {
            above_cents: settings.decline_above_cents,
            customers: settings.decline_customers.clone(),
        }),
        knobs: faults::Knobs::default(),
        admin_token,
    };
    let readiness = Readiness::default();
    let app = http::routes(state)
        .merge(service_kit::http::ops_routes(readiness.clone(), metrics))
        .layer(axum::middleware::from_fn(service_kit::http::track_requests));
    tracing::info!(
        decline_above_cents = settings.decline_above_cents,
        decline_customers = settings.decline_customers.len(),
        "payment-gateway (a stand-in card processor) listening on http://{}",
        listener.local_addr()?
    );
    let server = tokio::spawn(service_kit::http_server::serve(
        listener,
        app,
        settings.http.clone(),
        shutdown.clone(),
    ));
    // Charges before refunds: a refund is never older than its charge.
    let pruned = ["charges", "refunds"].map(|table| PrunedTable {
        table,
        time_column: "created_at",
        keep: Keep::For(settings.ledger_retention),
    });
    let pruning = tokio::spawn(service_kit::pruning::run(
        pool.clone(),
        pruned.to_vec(),
        None,
        shutdown.clone(),
    ));
    readiness.set_ready();
    server.await??;
    pruning.await?;
    pool.close().await;
    tracing::info!("payment-gateway stopped");
    Ok(())
}
