//! Postgres over TLS with `sslmode=verify-full`: the whole saga runs against a server that lets
//! the system's role in over TLS only, and a process given a CA that did not sign the server's
//! certificate refuses to start, saying why.

use std::time::Duration;

use e2e::pg_cluster::{PgCluster, TLS_ROLE_PASSWORD};
use e2e::tls::make_ca_and_server_cert;
use e2e::{Stack, StackOptions, binary, target_dir};
use sqlx::Connection;
use uuid::Uuid;

fn server_url(cluster: &PgCluster, ca: &std::path::Path) -> String {
    format!(
        "postgres://saga:{TLS_ROLE_PASSWORD}@localhost:{}?sslmode=verify-full&sslrootcert={}",
        cluster.port,
        ca.display()
    )
}

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn the_saga_runs_over_verified_tls_and_an_untrusted_certificate_is_refused() {
        e2e::requires_own_stack("starts a Postgres cluster of its own with TLS");
        let log_dir = target_dir().join("e2e-logs").join("postgres_tls-postgres");
        let dir = std::env::temp_dir().join(format!("order-saga-tls-{}", Uuid::new_v4().simple()));
        let cluster = tokio::task::block_in_place(|| PgCluster::start_with_tls(&dir, &log_dir))
            .expect("a Postgres cluster with TLS");
        let mut stack = Stack::start_with(
            "postgres_tls",
            StackOptions {
                postgres_url: Some(server_url(&cluster, &cluster.ca_file())),
                ..StackOptions::default()
            },
        )
        .await;
        stack.put_product("A", 100, 5).await;
        let order = stack.place_order(&[("A", 2)]).await;
        stack
            .wait_for_statuses(&[order], &["CONFIRMED"], Duration::from_secs(90))
            .await;

        // Every connection of the system's role is encrypted (the server rejects plain ones).
        let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", cluster.url()))
            .await
            .unwrap();
        let (encrypted, plain): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'saga'",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap();
        assert!(
            encrypted >= 3,
            "{encrypted} TLS connections of the services and the relay"
        );
        assert_eq!(plain, 0);

        // A CA that did not sign the server's certificate: the process exits and says why.
        let other = dir.join("other-ca");
        std::fs::create_dir_all(&other).unwrap();
        make_ca_and_server_cert(&other, "ca", None).unwrap();
        let run = tokio::process::Command::new(binary("order-service"))
            .args([
                "--listen-addr",
                "127.0.0.1:0",
                "--kafka-bootstrap-servers",
                &stack.broker.bootstrap,
                "--database-url",
                &e2e::db_url(
                    &server_url(&cluster, &other.join("ca.crt")),
                    "orders_untrusted",
                ),
            ])
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("order-service gives up on an untrusted server within a minute")
            .unwrap();
        // Its log (stdout) and anything else it wrote (stderr).
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            !output.status.success(),
            "started against an untrusted server"
        );
        assert!(
            printed.to_lowercase().contains("certificate"),
            "the error names the certificate: {printed}"
        );
        assert!(
            !printed.contains(TLS_ROLE_PASSWORD),
            "the password is in the error"
        );
        assert!(stack.exited().is_empty(), "{:?}", stack.exited());
        // The processes were given the password in their database URLs: their logs never show it.
        let mut read = Vec::new();
        for log in std::fs::read_dir(target_dir().join("e2e-logs").join("postgres_tls")).unwrap() {
            let log = log.unwrap().path();
            let text =
                std::fs::read(&log).unwrap_or_else(|e| panic!("reading {}: {e}", log.display()));
            assert!(
                !String::from_utf8_lossy(&text).contains(TLS_ROLE_PASSWORD),
                "{} shows the database password",
                log.display()
            );
            read.push(log.file_name().unwrap().to_string_lossy().into_owned());
        }
        for process in [
            "order-service.log",
            "inventory-service.log",
            "outbox-relay.log",
        ] {
            assert!(
                read.iter().any(|r| r == process),
                "{process} was not among the logs read: {read:?}"
            );
        }
    }
}
