//! The monitoring set-up works against the real system: `promtool` accepts
//! `deploy/prometheus/`, and a real Prometheus (Debian's package) scraping a stack through a
//! real run answers every PromQL expression of the Grafana dashboards and the alert rules with
//! at least one series. An expression that does not parse, or names a metric or label that no
//! process exports, fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::{Proc, Stack, StackOptions, eventually, free_port, kafka};
use schemas::{CancelReason, Event, OrderAwaitingPayment, OrderRefundRequested, StockReleased};
use serde_json::Value;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(90);

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (Debian's prometheus package; scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every `expr` of every panel target of every dashboard, with where it came from.
fn dashboard_queries() -> Vec<(String, String)> {
    let dir = deploy_dir().join("grafana/dashboards");
    let mut queries = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let panels = dashboard["panels"].as_array().expect("panels");
        assert!(!panels.is_empty(), "{file} has no panels");
        for panel in panels {
            assert_eq!(
                panel["datasource"]["uid"], "prometheus",
                "{file}: panel {} must use the provisioned datasource",
                panel["title"]
            );
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr").to_owned();
                queries.push((format!("{file}: {}", panel["title"]), expr));
            }
        }
    }
    queries
}

/// The query part of every alert rule (`<query> <op> <threshold>` on one line): the comparison
/// is what makes an alert fire; the query must return series whether it fires or not.
fn alert_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy_dir().join("prometheus/alerts.yml")).unwrap();
    let mut alert = String::new();
    let mut queries = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert:") {
            alert = name.trim().to_owned();
        } else if let Some(expr) = line.strip_prefix("expr:") {
            let expr = expr.trim();
            let (query, _threshold) = ["==", "!=", ">=", "<=", ">", "<"]
                .iter()
                .find_map(|op| expr.rsplit_once(&format!(" {op} ")))
                .unwrap_or_else(|| panic!("alert {alert}: expected `<query> <op> <threshold>`"));
            queries.push((format!("alerts.yml: {alert}"), query.to_owned()));
        }
    }
    assert!(!queries.is_empty(), "no alert rules found");
    queries
}

/// Produces `event` as the relay would, with the given message id.
async fn send(stack: &Stack, event: &Event, message_id: &str) {
    let key = event.order_id().to_string();
    kafka::produce(
        &stack.broker.bootstrap,
        event.topic(),
        None,
        Some(&key),
        &[
            ("message-id", message_id),
            ("event-type", event.event_type()),
            ("content-type", schemas::AVRO_CONTENT_TYPE),
            ("correlation-id", &key),
        ],
        &schemas::encode(event),
    )
    .await
    .unwrap();
}

/// Starts Prometheus with `config` on a free port and waits until it is ready; returns it and its
/// URL. A port another test took first is given up for another.
async fn start_prometheus(stack: &Stack, config: &Path, dir: &Path) -> (Proc, String) {
    for _ in 0..5 {
        let port = free_port();
        let mut prometheus = Proc::spawn_logging(
            "prometheus",
            Path::new("prometheus"),
            &[
                format!("--config.file={}", config.display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
            ],
            stack.log_dir(),
            "info",
            &[],
        );
        if !e2e::owns_port(&mut prometheus, port).await {
            continue;
        }
        let api = format!("http://127.0.0.1:{port}");
        eventually(Duration::from_secs(60), || async {
            let r = stack.http.get(format!("{api}/-/ready")).send().await?;
            Ok(r.status().is_success().then_some(()))
        })
        .await
        .expect("Prometheus is ready");
        return (prometheus, api);
    }
    panic!(
        "5 ports were taken by the time Prometheus started on them; {}",
        stack.where_logs_are()
    )
}

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn every_dashboard_and_alert_query_returns_series_from_a_real_run() {
        e2e::requires_own_stack(
            "starts the services with short retry delays and scrapes them with its own Prometheus",
        );
        promtool(&[
            "check",
            "config",
            deploy_dir()
                .join("prometheus/prometheus.yml")
                .to_str()
                .unwrap(),
        ]);
        promtool(&[
            "check",
            "rules",
            deploy_dir().join("prometheus/alerts.yml").to_str().unwrap(),
        ]);

        let mut stack = Stack::start_with(
            "prometheus",
            StackOptions {
                retry_delays: Some("200ms".into()),
                payments: true,
                ..StackOptions::default()
            },
        )
        .await;

        stack.start_monitor().await;
        // Prometheus scrapes the stack every second, with the deploy config's job names and rules.
        let dir = stack.log_dir().join("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let host_port = |url: &str| url.trim_start_matches("http://").to_owned();
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [{rules:?}]\n\
             scrape_configs:\n\
             - {{job_name: order-service, static_configs: [{{targets: [{order:?}]}}]}}\n\
             - {{job_name: inventory-service, static_configs: [{{targets: [{inventory:?}]}}]}}\n\
             - {{job_name: payment-service, static_configs: [{{targets: [{payment:?}]}}]}}\n\
             - {{job_name: payment-gateway, static_configs: [{{targets: [{gateway:?}]}}]}}\n\
             - {{job_name: outbox-relay, static_configs: [{{targets: [{relay:?}]}}]}}\n\
             - {{job_name: saga-monitor, static_configs: [{{targets: [{monitor:?}]}}]}}\n",
            rules = deploy_dir().join("prometheus/alerts.yml"),
            order = host_port(&stack.order_url),
            inventory = host_port(&stack.inventory_url),
            payment = host_port(&stack.payment_url),
            gateway = host_port(&stack.gateway_url),
            relay = host_port(&stack.relay_metrics_url),
            monitor = host_port(&stack.monitor_url),
        );
        let deploy_config =
            std::fs::read_to_string(deploy_dir().join("prometheus/prometheus.yml")).unwrap();
        for job in [
            "order-service",
            "inventory-service",
            "payment-service",
            "payment-gateway",
            "outbox-relay",
            "saga-monitor",
        ] {
            assert!(
                deploy_config.contains(&format!("job_name: {job}")),
                "deploy/prometheus/prometheus.yml has no job {job}"
            );
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let (_prometheus, api) = start_prometheus(&stack, &config_path, &dir).await;

        // A run that makes every series: confirmed, rejected and cancelled sagas, HTTP errors, a
        // poison record (dead letter), a "not yet" event (retries, then a dead letter) and a
        // redelivered message (duplicate).
        stack.put_product("A", 100, 5).await;
        let (confirmed, rejected) = stack.one_saga_of_each_outcome().await;
        assert_eq!(stack.cancel(rejected).await.0, 409);
        kafka::produce(
            &stack.broker.bootstrap,
            schemas::ORDERS_TOPIC,
            None,
            Some("poison"),
            &[],
            b"not avro",
        )
        .await
        .unwrap();
        let released = |order_id| {
            Event::StockReleased(StockReleased {
                order_id,
                reservation_id: Uuid::nil(),
                reason: "test".into(),
                released_at: 1,
            })
        };
        send(
            &stack,
            &released(Uuid::new_v4()),
            &Uuid::new_v4().to_string(),
        )
        .await;
        let twice = Uuid::new_v4().to_string();
        send(&stack, &released(confirmed), &twice).await;
        send(&stack, &released(confirmed), &twice).await;
        // A payment charged and refunded by hand-made order events (the sagas above make no
        // refund), so that every call to the processor has latencies and outcomes.
        let paid = Uuid::new_v4();
        let now = chrono::Utc::now().timestamp_millis();
        let asked = Event::OrderAwaitingPayment(OrderAwaitingPayment {
            order_id: paid,
            customer_id: Uuid::new_v4(),
            amount_cents: 500,
            pay_by: now + 30_000,
            at: now,
        });
        send(&stack, &asked, &Uuid::new_v4().to_string()).await;
        let payment = format!("{}/payments?order_id={paid}", stack.payment_url);
        eventually(TIMEOUT, || async {
            Ok((stack.get_json(&payment).await[0]["status"] == "CONFIRMED").then_some(()))
        })
        .await
        .expect("the payment is charged");
        let refund = Event::OrderRefundRequested(OrderRefundRequested {
            order_id: paid,
            amount_cents: 500,
            reason: CancelReason::CustomerRequest,
            requested_at: now,
        });
        send(&stack, &refund, &Uuid::new_v4().to_string()).await;

        let mut queries = dashboard_queries();
        queries.extend(alert_queries());
        let http = reqwest::Client::new();
        let failures = eventually(TIMEOUT, || {
            let (http, api, queries) = (&http, &api, &queries);
            async move {
                let mut failures = Vec::new();
                for (place, expr) in queries {
                    let answer: Value = match http
                        .get(format!("{api}/api/v1/query"))
                        .query(&[("query", expr)])
                        .send()
                        .await
                    {
                        Ok(r) => r.json().await.unwrap_or(Value::Null),
                        Err(e) => {
                            failures.push(format!("{place}: Prometheus not answering: {e}"));
                            continue;
                        }
                    };
                    if answer["status"] != "success" {
                        failures.push(format!("{place}: `{expr}`: {}", answer["error"]));
                    } else if answer["data"]["result"]
                        .as_array()
                        .is_none_or(|r| r.is_empty())
                    {
                        failures.push(format!("{place}: `{expr}` returned no series"));
                    }
                }
                // Parse errors never heal: report them (alone) at once.
                let unparsable: Vec<String> = failures
                    .iter()
                    .filter(|f| f.contains("parse error"))
                    .cloned()
                    .collect();
                if !unparsable.is_empty() {
                    return Ok(Some(unparsable));
                }
                if failures.is_empty() {
                    Ok(Some(failures))
                } else {
                    anyhow::bail!("{}", failures.join("\n"))
                }
            }
        })
        .await
        .unwrap_or_else(|e| panic!("queries without series after {TIMEOUT:?}:\n{e}"));
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        println!("{} queries answered with series", queries.len());
    }
}
