//! Kafka over TLS: the broker is reachable only through a TLS-terminating proxy (Tansu's own TLS
//! is not usable), with a certificate for `localhost` signed by a CA of the test's own. The relay,
//! both services and `saga` work with `security.protocol=ssl`, the CA file and hostname
//! verification (librdkafka's default), configured only through `--kafka-config`; a process given
//! a CA that did not sign the broker's certificate never gets ready and logs why.

use std::time::{Duration, Instant};

use e2e::tls::make_ca_and_server_cert;
use e2e::{Stack, StackOptions, binary, free_port};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn the_saga_runs_over_kafka_tls_and_an_untrusted_broker_certificate_is_refused() {
        e2e::requires_own_stack("puts its broker behind a TLS proxy");
        let stack = Stack::start_with(
            "kafka_tls",
            StackOptions {
                kafka_tls: true,
                ..StackOptions::default()
            },
        )
        .await;
        assert!(stack.broker.bootstrap.starts_with("localhost:"));
        stack.put_product("A", 100, 5).await;
        let confirmed = stack.place_order(&[("A", 2)]).await;
        let rejected = stack.place_order(&[("A", 50)]).await;
        stack
            .wait_for_statuses(
                &[confirmed, rejected],
                &["CONFIRMED", "REJECTED"],
                Duration::from_secs(90),
            )
            .await;

        // saga reads the topics over TLS too: the audit finds every record applied.
        let (status, report, stderr) = stack.audit("0s", &[]);
        assert_eq!(status, 0, "saga audit over TLS: {stderr} {report}");

        // Another CA: the broker's certificate is not trusted; the service never gets ready and
        // says why.
        let other = std::env::temp_dir().join(format!("order-saga-other-ca-{}", free_port()));
        std::fs::create_dir_all(&other).unwrap();
        make_ca_and_server_cert(&other, "ca", None).unwrap();
        let mut child = tokio::process::Command::new(binary("order-service"))
            .args([
                "--listen-addr",
                "127.0.0.1:0",
                "--database-url",
                &e2e::db_url(&stack.pg, &stack.orders_db),
                "--kafka-bootstrap-servers",
                &stack.broker.bootstrap,
                "--kafka-config",
                "security.protocol=ssl",
                "--kafka-config",
                &format!("ssl.ca.location={}", other.join("ca.crt").display()),
            ])
            .env("RUST_LOG", "info")
            .env_remove("KAFKA_CONFIG")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        let mut listening: Option<String> = None;
        let said_why = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, lines.next_line()).await {
                Ok(Ok(Some(line))) => {
                    assert!(
                        !line.contains("order-service ready"),
                        "ready with an untrusted broker"
                    );
                    if line.contains("certificate verify failed") {
                        break true;
                    }
                    if let Some((_, addr)) = line.split_once("listening on http://") {
                        listening = addr.split_whitespace().next().map(str::to_owned);
                    }
                    seen.push(line);
                }
                _ => break false,
            }
        };
        assert!(said_why, "no log line names the certificate: {seen:#?}");
        // And it stays unready: readiness answers, and never 200.
        let addr = listening.expect("order-service logged where it listens");
        let readyz = format!("http://{addr}/readyz");
        let mut answers = Vec::new();
        for _ in 0..10 {
            if let Ok(r) = stack.http.get(&readyz).send().await {
                answers.push(r.status().as_u16());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = child.kill().await;
        let _ = std::fs::remove_dir_all(&other);
        assert!(!answers.is_empty(), "{readyz} never answered");
        assert!(
            answers.iter().all(|s| *s != 200),
            "ready with an untrusted broker: {answers:?}"
        );
    }
}
