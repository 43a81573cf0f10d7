//! For tests of the crates built on the kit (feature `testing`): a database of the test's own,
//! made afresh and migrated as a process migrates its own.

use sqlx::PgPool;
use sqlx::migrate::Migrator;

/// Drops and creates the database `{name}_{pid}` on the test Postgres (`E2E_POSTGRES_URL`, by
/// default the local one, which `scripts/test.sh` starts), and migrates it with the kit's
/// migrations and `migrations`. The process id keeps parallel runs of one test apart.
pub async fn database(name: &str, migrations: &[&Migrator]) -> PgPool {
    let server = std::env::var("E2E_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let db = format!("{name}_{}", std::process::id());
    let admin = PgPool::connect(&format!("{server}/postgres"))
        .await
        .expect("the test Postgres (scripts/test.sh starts it)");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&admin)
        .await
        .expect("dropping the test's database");
    admin.close().await;
    crate::db::connect_and_migrate(&format!("{server}/{db}"), 20, migrations)
        .await
        .expect("the test's database")
}
