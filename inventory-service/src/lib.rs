//! inventory-service: keeps products and stock over HTTP and reacts to order events: reserves an
//! order's lines all or none, and sells the stock when the order is confirmed.

pub mod consumer;
pub mod domain;
pub mod http;
pub mod store;

use clap::Parser;
use messaging::service::{CommonSettings, ServiceConfig, ServiceMetrics, ServiceSpec};
use service_kit::http_server::ListenAddr;
use service_kit::pruning::{Keep, PrunedTable};
use service_kit::shutdown::Shutdown;

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// inventory-service settings: flags or environment variables; defaults fit the local stack.
#[derive(Debug, Clone, Parser)]
#[command(name = "inventory-service", version, about)]
pub struct Settings {
    /// Address the HTTP API listens on (HOST:PORT), or `stdin`: a listening socket given as
    /// standard input (inetd, systemd `StandardInput=socket`).
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8081")]
    pub listen_addr: ListenAddr,
    /// The inventory database (created if missing).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/inventory"
    )]
    pub database_url: String,
    /// A file whose first line is the bearer token that `PUT /products/{sku}` requires (or set
    /// the ADMIN_TOKEN environment variable). Neither: the route is open, as on the local stack.
    #[arg(long, env = "ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub common: CommonSettings,
}

/// Runs the service until `shutdown` fires.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    let admin_token =
        service_kit::http::AdminToken::from_env_or_file(settings.admin_token_file.as_deref())?;
    if admin_token.is_set() {
        tracing::info!("PUT /products/{{sku}} requires the admin token");
    } else {
        tracing::warn!(
            "PUT /products/{{sku}} is open to every client: set ADMIN_TOKEN or --admin-token-file to protect it"
        );
    }
    let spec = ServiceSpec {
        name: "inventory-service",
        migrations: &MIGRATIONS,
        group: consumer::GROUP,
        subscribe: &[schemas::ORDERS_TOPIC],
        handler: consumer::OrderEvents,
        routes: move |pool| http::routes(http::AppState { pool, admin_token }),
        background: Vec::new(),
        jobs: service_kit::jobs::Runner::default(),
        // A cancellation seen before its OrderPlaced is kept as long as that OrderPlaced (or a
        // copy of it) can still arrive.
        pruned: vec![PrunedTable {
            table: "cancelled_orders",
            time_column: "cancelled_at",
            keep: Keep::DuplicateWindow,
        }],
        metrics: ServiceMetrics {
            describe: consumer::describe_metrics,
            buckets: &[],
            zero_counters: &[
                (
                    "inventory_reservations_total",
                    &[&[("outcome", "reserved")], &[("outcome", "rejected")]],
                ),
                (
                    "inventory_releases_total",
                    &[&[("from", "RESERVED")], &[("from", "COMMITTED")]],
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
