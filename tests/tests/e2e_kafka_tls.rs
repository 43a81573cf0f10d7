//! Kafka over TLS: the broker is reachable only through a TLS-terminating proxy (Tansu's own TLS
//! is not usable), with a certificate for `localhost` signed by a CA of the test's own. The relay,
//! both services and `saga` work with `security.protocol=ssl`, the CA file and hostname
//! verification (librdkafka's default), configured only through `--kafka-config`; a process given
//! a CA that did not sign the broker's certificate never gets ready and logs why.

use std::time::{Duration, Instant};

use e2e::tls::make_ca_and_server_cert;
use e2e::{Stack, StackOptions, binary, free_port};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread")]
async fn the_saga_runs_over_kafka_tls_and_an_untrusted_broker_certificate_is_refused() {
    if e2e::needs_own_stack("puts its broker behind a TLS proxy") {
        return;
    }
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
    let port = free_port();
    let mut child = tokio::process::Command::new(binary("order-service"))
        .args([
            "--listen-addr",
            &format!("127.0.0.1:{port}"),
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
                seen.push(line);
            }
            _ => break false,
        }
    };
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&other);
    assert!(said_why, "no log line names the certificate: {seen:#?}");
}
