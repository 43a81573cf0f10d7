//! Database setup: create the service's database when it is missing, connect, and run the
//! migrations of every crate that owns tables in it as one ordered set. Versions: 1..49 the
//! messaging runtime's (outbox, inbox, parking), 50..99 the kit's (`jobs`), 100 and up the
//! service's own.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// Migrations of the kit's own tables (`jobs`), versions 50..99.
pub static MIGRATIONS: Migrator = sqlx::migrate!("./migrations");

/// Creates the database named in `url` if it does not exist yet, connects a pool, and applies the
/// kit's migrations and `others` (the messaging runtime's, the service's) in version order.
pub async fn connect_and_migrate(
    url: &str,
    max_connections: u32,
    others: &[&Migrator],
) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .with_context(|| format!("bad database url {}", redacted(url)))?;
    create_database_if_missing(&options).await?;
    let pool = connect_with(options, max_connections).await?;
    let mut migrations: Vec<_> = std::iter::once(&MIGRATIONS)
        .chain(others.iter().copied())
        .flat_map(|m| m.migrations.iter())
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

/// A pool of at most `max_connections` to the database of `url` (which must exist).
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .with_context(|| format!("bad database url {}", redacted(url)))?;
    connect_with(options, max_connections).await
}

async fn connect_with(options: PgConnectOptions, max_connections: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options.clone())
        .await
        .with_context(|| format!("connecting to database {:?}", options.get_database()))
}

/// `url` with its password replaced by `***`, for logs and errors.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return format!("{scheme}://{authority}{}", redacted_query(tail));
    };
    let userinfo = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => userinfo.to_owned(),
    };
    format!("{scheme}://{userinfo}@{host}{}", redacted_query(tail))
}

/// A `password=` parameter of a URL's query, replaced by `***`.
fn redacted_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => p.to_owned(),
        })
        .collect();
    format!("{path}?{}", params.join("&"))
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
        sqlx::Error::Database(e) => e.code().is_some_and(|code| is_transient_code(&code)),
        _ => false,
    }
}

/// Whether a Postgres error code (SQLSTATE) means "later", not "never": a message that failed
/// with one must wait and be retried, never be dead-lettered.
pub fn is_transient_code(code: &str) -> bool {
    matches!(
        code,
        "40001" // serialization_failure
            | "40P01" // deadlock_detected
            | "55P03" // lock_not_available
            | "25006" // read_only_sql_transaction: a standby, or a primary just demoted by a failover
            | "57014" // query_canceled: statement timeout, or cancelled by an operator
    ) || code.starts_with("08") // connection exceptions
        || code.starts_with("53") // insufficient resources (disk full, out of memory, too many connections)
        || code.starts_with("57P") // operator intervention: admin/crash shutdown, cannot connect now
        || code.starts_with("58") // system errors (I/O error, ...)
}

#[cfg(test)]
mod tests {
    use super::{is_transient_code, redacted};

    #[test]
    fn codes_that_mean_later_are_transient() {
        for code in [
            "40001", "40P01", "55P03", "25006", "57014", "57P01", "57P02", "57P03", "58000",
            "58030", "08006", "08001", "53100", "53300",
        ] {
            assert!(is_transient_code(code), "{code} means later");
        }
    }

    #[test]
    fn codes_that_mean_never_are_not() {
        for code in [
            "23505", "23514", "22003", "42P01", "42703", "22P02", "25P02",
        ] {
            assert!(
                !is_transient_code(code),
                "{code} will fail again the same way"
            );
        }
    }

    #[test]
    fn passwords_never_leave_a_url_in_logs() {
        for (url, shown) in [
            (
                "postgres://app:s3cr%40t@db:5432/orders",
                "postgres://app:***@db:5432/orders",
            ),
            (
                "postgres://app:p@ss@db/orders?sslmode=require",
                "postgres://app:***@db/orders?sslmode=require",
            ),
            ("postgres://app@db/orders", "postgres://app@db/orders"),
            (
                "postgres://db/orders?user=app&password=x&sslmode=verify-full",
                "postgres://db/orders?user=app&password=***&sslmode=verify-full",
            ),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redacted(url), shown);
        }
    }
}
