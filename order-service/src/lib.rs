//! order-service: places orders over HTTP (order row, read-model row and OrderPlaced outbox row in
//! one transaction) and reacts to inventory events to confirm or reject them.

pub mod consumer;
pub mod domain;
pub mod http;
pub mod store;

use std::net::SocketAddr;

use clap::Parser;
use messaging::service::{ServiceConfig, ServiceSpec};
use messaging::shutdown::Shutdown;

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// order-service settings: flags or environment variables; defaults fit the local stack.
#[derive(Debug, Clone, Parser)]
#[command(name = "order-service", version, about)]
pub struct Settings {
    /// Address the HTTP API listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen_addr: SocketAddr,
    /// The orders database (created if missing).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/orders"
    )]
    pub database_url: String,
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    pub kafka_bootstrap_servers: String,
    /// Partitions of the topics this service creates when they are missing.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 3)]
    pub topic_partitions: i32,
    /// Most database connections the service holds.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 10)]
    pub db_max_connections: u32,
}

/// Runs the service until `shutdown` fires.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    let spec = ServiceSpec {
        name: "order-service",
        migrations: &MIGRATIONS,
        group: consumer::GROUP,
        subscribe: schemas::INVENTORY_TOPIC,
        handler: consumer::InventoryEvents,
        routes: |pool| http::routes(http::AppState { pool }),
    };
    let config = ServiceConfig {
        listen_addr: settings.listen_addr,
        database_url: settings.database_url,
        kafka_bootstrap_servers: settings.kafka_bootstrap_servers,
        topic_partitions: settings.topic_partitions,
        db_max_connections: settings.db_max_connections,
    };
    messaging::service::run(spec, config, shutdown).await
}
