//! Measures the saga on the real binaries and prints the numbers (nothing is asserted):
//! - commit→produce: an order's outbox row commit (its created_at) to the relay producing it
//!   (the Kafka record's CreateTime), with an idle relay, orders placed one at a time;
//! - placed→confirmed: the whole saga per order (both services, the relay twice, the broker);
//! - throughput: orders accepted per second over HTTP at a given concurrency, and the time until
//!   every one of them is confirmed.
//!
//! Run: `cargo build --release --bins && cargo run --release -p e2e --bin saga-bench`
//! (options: `--sequential N`, `--burst N`, `--concurrency N`).

use std::time::{Duration, Instant};

use e2e::{Stack, kafka};
use futures::StreamExt;
use schemas::Event;
use uuid::Uuid;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentiles(mut values: Vec<f64>) -> String {
    values.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    format!(
        "n={:<5} p50={:>7.1} ms  p90={:>7.1} ms  p99={:>7.1} ms  max={:>7.1} ms",
        values.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    )
}

#[tokio::main]
async fn main() {
    let sequential = arg("--sequential", 300);
    let burst = arg("--burst", 3000);
    let concurrency = arg("--concurrency", 32);
    eprintln!(
        "starting broker, services and relay ({})",
        e2e::target_dir().display()
    );
    let stack = Stack::start("saga-bench").await;
    stack.put_product("BENCH", 100, 10_000_000).await;

    eprintln!("placing {sequential} orders one at a time, 20 ms apart (idle relay)");
    let mut ids = Vec::new();
    let mut post_latency = Vec::new();
    for _ in 0..sequential {
        let t = Instant::now();
        ids.push(stack.place_order(&[("BENCH", 1)]).await);
        post_latency.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack
        .wait_for_statuses(&ids, &["CONFIRMED"], Duration::from_secs(120))
        .await;
    let records = kafka::read_topic(&stack.broker.bootstrap, schemas::ORDERS_TOPIC)
        .await
        .expect("read orders.v1");
    let mut commit_to_produce = Vec::new();
    let mut placed_to_confirmed = Vec::new();
    for record in &records {
        if let Ok(Event::OrderPlaced(placed)) = record.event()
            && let Some(ts) = record.timestamp
        {
            commit_to_produce.push((ts - placed.placed_at) as f64);
        }
    }
    for id in &ids {
        let order = stack.order(*id).await;
        let at = |i: usize| {
            order["history"][i]["at"]
                .as_str()
                .and_then(chrono_millis)
                .expect("history time")
        };
        placed_to_confirmed.push((at(1) - at(0)) as f64);
    }

    let relay_metrics = stack
        .http
        .get(format!("{}/metrics", stack.relay_metrics_url))
        .send()
        .await
        .expect("relay metrics")
        .text()
        .await
        .expect("relay metrics text");
    let within = |name: &str, le: &str| {
        let total = e2e::sum_metric(
            &relay_metrics,
            name,
            &[("source", "orders"), ("le", "+Inf")],
        );
        let fast = e2e::sum_metric(&relay_metrics, name, &[("source", "orders"), ("le", le)]);
        format!("{:.1}% of {total}", 100.0 * fast / total.max(1.0))
    };
    let relay_summary = format!(
        "within 20 ms: commit→ack {}; send→ack {} (batches)",
        within("relay_commit_to_ack_seconds_bucket", "0.02"),
        within("relay_send_to_ack_seconds_bucket", "0.02"),
    );

    eprintln!("placing {burst} orders, {concurrency} at a time");
    let started = Instant::now();
    let burst_ids: Vec<Uuid> = futures::stream::iter(0..burst)
        .map(|_| stack.place_order(&[("BENCH", 1)]))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let accepted = started.elapsed();
    stack
        .wait_for_statuses(&burst_ids, &["CONFIRMED"], Duration::from_secs(600))
        .await;
    let finished = started.elapsed();

    println!(
        "saga-bench ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "POST /orders (one by one)     {}",
        percentiles(post_latency)
    );
    println!(
        "commit→produce (idle relay)   {}",
        percentiles(commit_to_produce)
    );
    println!(
        "placed→confirmed (one by one) {}",
        percentiles(placed_to_confirmed)
    );
    println!("relay (orders source)         {relay_summary}");
    println!(
        "burst of {burst}: accepted over HTTP in {:.2} s ({:.0} orders/s at concurrency {concurrency}); all confirmed after {:.2} s ({:.0} sagas/s)",
        accepted.as_secs_f64(),
        burst as f64 / accepted.as_secs_f64(),
        finished.as_secs_f64(),
        burst as f64 / finished.as_secs_f64()
    );
}

/// RFC 3339 with milliseconds ("2026-11-22T05:39:06.204Z") to Unix milliseconds.
fn chrono_millis(s: &str) -> Option<i64> {
    s.parse::<chrono::DateTime<chrono::Utc>>()
        .ok()
        .map(|t| t.timestamp_millis())
}
