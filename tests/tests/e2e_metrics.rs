//! Every process's `/metrics` is valid Prometheus text (`promtool check metrics`, from Debian's
//! prometheus package) and has the metrics the README and the dashboards rely on.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::{Stack, eventually};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `promtool check metrics` on `text`; returns what it reported (empty when all is well).
fn promtool_problems(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && report.trim().is_empty() {
        String::new()
    } else {
        format!("exit {}: {report}", out.status)
    }
}

fn names(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metrics_endpoint_passes_promtool_and_has_the_documented_metrics() {
    let mut stack = Stack::start("metrics").await;
    stack.start_monitor().await;
    stack.put_product("A", 100, 2).await;
    // A confirmed saga, a rejected one and a cancelled one, so every saga series exists.
    stack.one_saga_of_each_outcome().await;
    // Lag gauges come from librdkafka's statistics, every 5 s on each consumer's own clock, and
    // only once its group has committed an offset: wait for both consuming services.
    for (process, url) in [
        ("order-service", &stack.order_url),
        ("inventory-service", &stack.inventory_url),
        ("payment-service", &stack.payment_url),
    ] {
        eventually(TIMEOUT, || async {
            let text = stack.metrics_text(url).await;
            // Both gauges are set on their own 5 s clocks (statistics, ownership check).
            Ok((text.contains("consumer_lag_messages")
                && text.contains("consumer_unowned_partitions")
                && text.contains("consumer_parked_keys"))
            .then_some(()))
        })
        .await
        .unwrap_or_else(|e| {
            panic!("{process} exports no consumer_lag_messages or consumer_unowned_partitions: {e}")
        });
    }

    // What both services export: HTTP, their tables, and the consumer runtime.
    const SERVICES: &[&str] = &[
        "process_start_time_seconds",
        "http_requests_total",
        "http_request_duration_seconds",
        "http_requests_shed_total",
        "http_requests_timed_out_total",
        "db_table_rows",
        "db_table_oldest_row_age_seconds",
        "db_table_retention_seconds",
        "db_rows_pruned_total",
        "consumer_messages_processed_total",
        "consumer_handler_duration_seconds",
        "consumer_lag_messages",
        "consumer_offset_gaps_total",
        "consumer_unowned_partitions",
        "consumer_forced_rebalances_total",
        "consumer_parked_keys",
        "consumer_parked_key_oldest_age_seconds",
        "consumer_parked_heads_expired_total",
    ];
    // The monitor's lag gauges come from its client's statistics too.
    eventually(TIMEOUT, || async {
        let text = stack.metrics_text(&stack.monitor_url).await;
        Ok(text.contains("monitor_projection_lag").then_some(()))
    })
    .await
    .expect("saga-monitor exports monitor_projection_lag");
    let expected: [(&str, &str, &[&str], &[&str]); 6] = [
        (
            "order-service",
            &stack.order_url,
            SERVICES,
            &[
                "saga_started_total",
                "saga_completed_total",
                "saga_failed_total",
                "saga_compensations_total",
                "saga_duration_seconds",
                "orders_in_flight",
                "orders_in_flight_oldest_age_seconds",
            ],
        ),
        (
            "inventory-service",
            &stack.inventory_url,
            SERVICES,
            &["inventory_reservations_total", "inventory_releases_total"],
        ),
        (
            "payment-service",
            &stack.payment_url,
            SERVICES,
            &[
                "payments_requested_total",
                "payments_total",
                "payments_late_charges_total",
                "payments_in_flight",
                "payments_in_flight_oldest_age_seconds",
                "circuit_breaker_state",
                "circuit_breaker_calls_total",
                "circuit_breaker_call_duration_seconds",
                "outbound_calls_total",
                "outbound_call_duration_seconds",
                "jobs_attempts_total",
                "jobs_given_up_total",
            ],
        ),
        (
            "payment-gateway",
            &stack.gateway_url,
            &[],
            &[
                "process_start_time_seconds",
                "http_requests_total",
                "gateway_charges_total",
                "gateway_charged_cents_total",
            ],
        ),
        (
            "outbox-relay",
            &stack.relay_metrics_url,
            &[],
            &[
                "process_start_time_seconds",
                "relay_rows_published_total",
                "relay_publish_errors_total",
                "relay_outbox_pending_rows",
                "relay_outbox_oldest_pending_age_seconds",
                "relay_commit_to_ack_seconds",
                "relay_send_to_ack_seconds",
                "relay_batch_size",
            ],
        ),
        (
            "saga-monitor",
            &stack.monitor_url,
            &[],
            &[
                "process_start_time_seconds",
                "http_requests_total",
                "monitor_steps_projected_total",
                "monitor_records_unattributed_total",
                "monitor_offset_gaps_total",
                "monitor_write_failures_total",
                "monitor_projection_lag",
                "monitor_sagas",
                "monitor_stuck_sagas",
                "monitor_rebuild_running",
                "monitor_rebuild_behind_records",
            ],
        ),
    ];
    // Rare events are exported at 0 from the start, so rates and alerts over them have a series
    // (a shared stack may have had deadlines fire: there the series only has to exist).
    let order_text = stack.metrics_text(&stack.order_url).await;
    let deadline_series = "saga_failed_total{reason=\"deadline_exceeded\"} ";
    let exported = if stack.is_external() {
        order_text.contains(deadline_series)
    } else {
        order_text.contains(&format!("{deadline_series}0\n"))
    };
    assert!(exported, "{order_text}");
    for (process, url, shared, own) in expected {
        let text = stack.metrics_text(url).await;
        let problems = promtool_problems(&text);
        assert!(problems.is_empty(), "{process} /metrics: {problems}");
        let present = names(&text);
        for name in shared.iter().chain(own) {
            assert!(
                present.contains(name),
                "{process} does not export {name}; it exports {present:?}"
            );
        }
    }
}
