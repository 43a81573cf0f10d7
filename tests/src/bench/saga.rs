//! The whole saga, open loop: orders are offered over HTTP at a fixed rate whatever the system
//! does with them (a slow answer does not slow the offer), and each order's placed→terminal time
//! is read from its own status history (both times written by order-service).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::resources::{self, Usage, Watched};
use super::stats::Samples;
use crate::Stack;

/// Skus the benchmark orders spread over (each order takes one or two of them).
pub const SKUS: usize = 100;

/// Requests in flight at most; an offer that finds them all busy is counted as not made (the
/// load generator, or the system, could not keep up).
const MAX_IN_FLIGHT: usize = 2_000;

pub struct RateResult {
    pub offered_per_second: f64,
    pub window: Duration,
    pub accepted: usize,
    /// Non-201 answers and failed requests, by status ("error" for no answer).
    pub refused: Vec<(String, usize)>,
    /// Offers not made because [`MAX_IN_FLIGHT`] requests were already waiting.
    pub not_offered: usize,
    pub post: Samples,
    pub placed_to_terminal: Samples,
    /// From the last offer to the moment every accepted order was terminal.
    pub drain_after_window: Duration,
    /// From the moment every accepted order was terminal to the moment the saga monitor showed
    /// every one of them ended (when a monitor runs): how far behind the saga it was.
    pub monitor_behind: Option<Duration>,
    pub usage: Usage,
}

impl RateResult {
    /// A rate the system sustains: every offer accepted, p99 under 1 s, and no backlog left
    /// when the offer stops (every order terminal within 1.5 s of the last one).
    pub fn sustained(&self) -> bool {
        self.refused.is_empty()
            && self.not_offered == 0
            && self.placed_to_terminal.p99() < 1000.0
            && self.drain_after_window <= Duration::from_millis(1500)
    }

    pub fn json(&self) -> Value {
        json!({
            "offered_per_second": self.offered_per_second,
            "window_seconds": super::secs(self.window),
            "accepted": self.accepted,
            "refused": self.refused.iter().map(|(s, n)| json!({"status": s, "count": n})).collect::<Vec<_>>(),
            "not_offered": self.not_offered,
            "post_latency": self.post.json(),
            "placed_to_terminal": self.placed_to_terminal.json(),
            "seconds_to_drain_after_offer_stopped": super::secs(self.drain_after_window),
            "monitor_seconds_behind_at_end": self.monitor_behind.map(super::secs),
            "sustained": self.sustained(),
            "resources": self.usage.json(),
            "cpu_ms_per_saga": self.usage.per_process.keys()
                .map(|name| (name.clone(), json!(super::stats::round(self.usage.cpu_ms_per(name, self.accepted)))))
                .collect::<serde_json::Map<_, _>>(),
        })
    }

    /// CPU milliseconds per accepted order, per process and in all.
    pub fn describe_cpu_per_saga(&self) -> String {
        let per: Vec<String> = self
            .usage
            .per_process
            .keys()
            .map(|name| {
                format!(
                    "{name} {:.2} ms",
                    self.usage.cpu_ms_per(name, self.accepted)
                )
            })
            .collect();
        let total: f64 = self
            .usage
            .per_process
            .keys()
            .map(|name| self.usage.cpu_ms_per(name, self.accepted))
            .sum();
        format!("{}; {total:.2} ms in all", per.join(", "))
    }

    pub fn describe(&self) -> String {
        let monitor = self.monitor_behind.map_or(String::new(), |behind| {
            format!(
                "; the monitor showed them all {:.2} s later",
                behind.as_secs_f64()
            )
        });
        format!(
            "{:>5.0}/s offered: placed→terminal {}; drained {:.2} s after the offer stopped{monitor}; {} refused, {} not offered → {}",
            self.offered_per_second,
            self.placed_to_terminal.describe(),
            self.drain_after_window.as_secs_f64(),
            self.refused.iter().map(|(_, n)| n).sum::<usize>(),
            self.not_offered,
            if self.sustained() {
                "sustained"
            } else {
                "NOT sustained"
            }
        )
    }
}

/// Stocks the benchmark's skus (generously: no order is rejected for stock).
pub async fn stock(stack: &Stack) {
    for i in 0..SKUS {
        stack
            .put_product(&format!("BENCH-{i:03}"), 100 + i as i64, 1_000_000_000)
            .await;
    }
}

/// Offers `rate` orders a second for `window`, then waits for every accepted one to be
/// terminal, and, given the saga monitor's database, for the monitor to show them all ended,
/// measuring `watched` throughout.
pub async fn open_loop(
    stack: &Stack,
    orders: &PgPool,
    monitor: Option<&PgPool>,
    rate: f64,
    window: Duration,
    watched: &Watched,
) -> anyhow::Result<RateResult> {
    let n = (rate * window.as_secs_f64()).round() as usize;
    let url = format!("{}/orders", stack.order_url);
    let bodies: Vec<Value> = (0..n)
        .map(|i| {
            let first = rand::random_range(0..SKUS);
            let mut items =
                vec![json!({"sku": stack.sku(&format!("BENCH-{first:03}")), "quantity": 1})];
            if i % 2 == 1 {
                let second = (first + 1 + rand::random_range(0..SKUS - 1)) % SKUS;
                items.push(json!({"sku": stack.sku(&format!("BENCH-{second:03}")), "quantity": 2}));
            }
            json!({"customer_id": Uuid::new_v4(), "items": items})
        })
        .collect();
    let ((outcomes, not_offered, offered_at_end, ended, monitor_behind), usage) =
        resources::measure(watched, async {
            let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
            let mut requests = tokio::task::JoinSet::new();
            let mut not_offered = 0;
            let start = tokio::time::Instant::now();
            for (i, body) in bodies.into_iter().enumerate() {
                tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
                let Ok(permit) = semaphore.clone().try_acquire_owned() else {
                    not_offered += 1;
                    continue;
                };
                let (http, url) = (stack.http.clone(), url.clone());
                requests.spawn(async move {
                    let sent = Instant::now();
                    let answer = http.post(url).json(&body).send().await;
                    let latency = sent.elapsed().as_secs_f64() * 1000.0;
                    drop(permit);
                    let outcome = match answer {
                        Ok(r) if r.status() == 201 => match r.json::<Value>().await {
                            Ok(v) => v["order_id"]
                                .as_str()
                                .and_then(|s| s.parse::<Uuid>().ok())
                                .ok_or_else(|| "201 without order_id".to_owned()),
                            Err(e) => Err(format!("201 with a bad body: {e}")),
                        },
                        Ok(r) => Err(r.status().as_u16().to_string()),
                        Err(_) => Err("error".to_owned()),
                    };
                    (outcome, latency)
                });
            }
            let offered_at_end = Instant::now();
            let outcomes = requests.join_all().await;
            let ids: Vec<Uuid> = outcomes
                .iter()
                .filter_map(|(o, _)| o.clone().ok())
                .collect();
            let ended = wait_terminal(orders, &ids, Duration::from_secs(600)).await;
            let monitor_behind = match (monitor, &ended) {
                (Some(monitor), Ok(ended)) => {
                    Some(super::monitor::caught_up_after(monitor, &ids, *ended).await)
                }
                _ => None,
            };
            (outcomes, not_offered, offered_at_end, ended, monitor_behind)
        })
        .await;
    let ended = ended?;
    let monitor_behind = monitor_behind.transpose()?;
    let mut refused: Vec<(String, usize)> = Vec::new();
    let mut ids = Vec::new();
    let mut post = Vec::new();
    for (outcome, latency) in outcomes {
        post.push(latency);
        match outcome {
            Ok(id) => ids.push(id),
            Err(status) => match refused.iter_mut().find(|(s, _)| *s == status) {
                Some((_, count)) => *count += 1,
                None => refused.push((status, 1)),
            },
        }
    }
    let histories: Vec<sqlx::types::Json<Vec<Value>>> =
        sqlx::query_scalar("SELECT history FROM order_status_view WHERE order_id = ANY($1)")
            .bind(&ids)
            .fetch_all(orders)
            .await?;
    let at = |entry: &Value| {
        entry["at"]
            .as_str()
            .and_then(|s| s.parse::<chrono::DateTime<chrono::Utc>>().ok())
    };
    let placed_to_terminal = histories
        .iter()
        .filter_map(|h| {
            let (first, last) = (at(h.0.first()?)?, at(h.0.last()?)?);
            Some((last - first).num_microseconds()? as f64 / 1000.0)
        })
        .collect();
    Ok(RateResult {
        offered_per_second: rate,
        window,
        accepted: ids.len(),
        refused,
        not_offered,
        post: Samples::new(post),
        placed_to_terminal: Samples::new(placed_to_terminal),
        drain_after_window: ended.saturating_duration_since(offered_at_end),
        monitor_behind,
        usage,
    })
}

/// Waits until every order of `ids` is CONFIRMED, REJECTED or CANCELLED; when that happened.
async fn wait_terminal(
    orders: &PgPool,
    ids: &[Uuid],
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let (open, found): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status NOT IN ('CONFIRMED', 'REJECTED', 'CANCELLED')), \
             count(*) FROM order_status_view WHERE order_id = ANY($1)",
        )
        .bind(ids)
        .fetch_one(orders)
        .await?;
        if open == 0 && found == ids.len() as i64 {
            return Ok(Instant::now());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{open} of {} orders still not terminal after {timeout:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
