//! Database setup: create the service's database when it is missing, connect, and run the shared
//! (outbox, inbox) and service migrations as one ordered set.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// Migrations of the tables every service has: `outbox` (versions 1..99 are reserved for them) and
/// `inbox`. Service migrations start at version 100.
static SHARED: Migrator = sqlx::migrate!("./migrations");

/// Creates the database named in `url` if it does not exist yet, connects a pool, and applies the
/// shared migrations and `service` migrations in version order.
pub async fn connect_and_migrate(
    url: &str,
    max_connections: u32,
    service: &Migrator,
) -> anyhow::Result<PgPool> {
    let options =
        PgConnectOptions::from_str(url).with_context(|| format!("bad database url {url}"))?;
    create_database_if_missing(&options).await?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options.clone())
        .await
        .with_context(|| format!("connecting to database {:?}", options.get_database()))?;
    let mut migrations: Vec<_> = SHARED
        .migrations
        .iter()
        .chain(service.migrations.iter())
        .cloned()
        .collect();
    migrations.sort_by_key(|m| m.version);
    let migrator = Migrator {
        migrations: migrations.into(),
        ..Migrator::DEFAULT
    };
    migrator
        .run(&pool)
        .await
        .context("running database migrations")?;
    Ok(pool)
}

async fn create_database_if_missing(options: &PgConnectOptions) -> anyhow::Result<()> {
    let name = options
        .get_database()
        .context("the database url must name a database")?
        .to_owned();
    let admin = options.clone().database("postgres");
    let mut conn: PgConnection = admin
        .connect()
        .await
        .context("connecting to the postgres database to check that ours exists")?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match sqlx::query(&sql).execute(&mut conn).await {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another instance created it between our check and our CREATE.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e).context(format!("creating database {name}")),
        }
    }
    conn.close().await.ok();
    Ok(())
}

/// Whether a database error is worth retrying as it is: the server or network is unavailable, or the
/// transaction lost a serialization or deadlock race. Everything else (constraint violations, bad
/// SQL, decoding) will fail again the same way.
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(e) => {
            let code = e.code();
            let code = code.as_deref().unwrap_or("");
            // 40001 serialization_failure, 40P01 deadlock_detected, 08xxx connection exceptions,
            // 53xxx insufficient resources, 57P0x operator intervention (shutdown, crash),
            // 55P03 lock_not_available.
            code == "40001"
                || code == "40P01"
                || code == "55P03"
                || code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
        }
        _ => false,
    }
}
