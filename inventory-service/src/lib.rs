//! inventory-service: keeps products and stock over HTTP and reacts to order events: reserves an
//! order's lines all or none, and sells the stock when the order is confirmed.

pub mod consumer;
pub mod domain;
pub mod http;
pub mod store;

use std::net::SocketAddr;

use clap::Parser;
use messaging::service::{CommonSettings, ServiceConfig, ServiceSpec};
use messaging::shutdown::Shutdown;

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// inventory-service settings: flags or environment variables; defaults fit the local stack.
#[derive(Debug, Clone, Parser)]
#[command(name = "inventory-service", version, about)]
pub struct Settings {
    /// Address the HTTP API listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8081")]
    pub listen_addr: SocketAddr,
    /// The inventory database (created if missing).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/inventory"
    )]
    pub database_url: String,
    #[command(flatten)]
    pub common: CommonSettings,
}

/// Runs the service until `shutdown` fires.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    let spec = ServiceSpec {
        name: "inventory-service",
        migrations: &MIGRATIONS,
        group: consumer::GROUP,
        subscribe: schemas::ORDERS_TOPIC,
        handler: consumer::OrderEvents,
        routes: |pool| http::routes(http::AppState { pool }),
        background: Vec::new(),
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
    };
    let config = ServiceConfig {
        listen_addr: settings.listen_addr,
        database_url: settings.database_url,
        common: settings.common,
    };
    messaging::service::run(spec, config, shutdown).await
}
