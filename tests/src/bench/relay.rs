//! The relay alone: a broker, two outbox databases (the services' schema, no services) and the
//! real `outbox-relay` binary. Measures how fast it drains a pre-filled outbox and how long a row
//! waits from its commit to the broker's acknowledgement at a fixed offered rate.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use sqlx::PgPool;

use super::resources::{self, Usage, Watched};
use super::stats;
use crate::{Broker, Proc, binary, db_url};

/// The two sources, as the services name them: (source name, aggregate type, event type).
const SOURCES: [(&str, &str, &str); 2] = [
    ("orders", "order", "OrderPlaced"),
    ("inventory", "inventory", "StockReserved"),
];

pub struct RelayBench {
    pub broker: Broker,
    server: String,
    databases: Vec<String>,
    pools: Vec<PgPool>,
    admin: PgPool,
    relay: Option<Proc>,
    /// Where the relay serves its metrics, held through its restarts.
    metrics: std::net::TcpListener,
    log_dir: PathBuf,
    payload: Vec<u8>,
    /// Extra relay flags (`--batch-size 5000`, say).
    pub relay_args: Vec<String>,
}

impl RelayBench {
    pub async fn start(server: &str, log_dir: &Path) -> anyhow::Result<RelayBench> {
        let broker = Broker::start(log_dir).await;
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let mut databases = Vec::new();
        let mut pools = Vec::new();
        for (name, _, _) in SOURCES {
            let db = format!("bench_{name}_{suffix}");
            let pool = service_kit::db::connect_and_migrate(
                &db_url(server, &db),
                4,
                &[&messaging::MIGRATIONS],
            )
            .await?;
            databases.push(db);
            pools.push(pool);
        }
        let admin = service_kit::db::connect(&db_url(server, "postgres"), 2).await?;
        Ok(RelayBench {
            broker,
            server: server.to_owned(),
            databases,
            pools,
            admin,
            relay: None,
            metrics: crate::listener(),
            log_dir: log_dir.to_owned(),
            payload: super::order_placed_payload(),
            relay_args: Vec::new(),
        })
    }

    /// Starts the relay and waits until it is ready.
    pub async fn start_relay(&mut self) -> anyhow::Result<()> {
        let mut args = Vec::new();
        for ((name, _, _), db) in SOURCES.iter().zip(&self.databases) {
            args.extend([
                "--source".to_owned(),
                format!("{name}={}", db_url(&self.server, db)),
            ]);
        }
        args.extend([
            "--kafka-bootstrap-servers".to_owned(),
            self.broker.bootstrap.clone(),
            "--metrics-addr".to_owned(),
            "stdin".to_owned(),
        ]);
        args.extend(self.relay_args.iter().cloned());
        self.relay = Some(Proc::spawn_serving(
            "outbox-relay",
            &binary("outbox-relay"),
            &args,
            &self.log_dir,
            &[],
            &self.metrics,
        ));
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match http
                .get(format!("{}/readyz", crate::url_of(&self.metrics)))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => return Ok(()),
                other => anyhow::ensure!(
                    Instant::now() < deadline,
                    "the relay is not ready after 60 s ({other:?}); see {}",
                    self.log_dir.display()
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn stop_relay(&mut self) {
        if let Some(mut relay) = self.relay.take() {
            relay.stop();
        }
    }

    /// The relay, the broker and the relay's Postgres backends.
    pub async fn watched(&self) -> Watched {
        let mut watched = Watched::default();
        if let Some(pid) = self.relay.as_ref().and_then(Proc::pid) {
            watched.add("outbox-relay", pid);
        }
        if let Some(pid) = self.broker.pid() {
            watched.add("broker", pid);
        }
        let names: Vec<&str> = self.databases.iter().map(String::as_str).collect();
        watched.add_postgres_backends(&self.admin, &names).await;
        watched
    }

    /// Inserts `rows` outbox rows into source `index`, `per_statement` per transaction.
    async fn fill(&self, index: usize, rows: usize, per_statement: usize) -> anyhow::Result<()> {
        let (_, aggregate, event_type) = SOURCES[index];
        let mut left = rows;
        while left > 0 {
            let n = left.min(per_statement);
            sqlx::query(
                "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, \
                 content_type, payload, causation_id, traceparent) \
                 SELECT gen_random_uuid(), $1, gen_random_uuid()::text, $2, $3, $4, \
                 gen_random_uuid(), $5 FROM generate_series(1, $6)",
            )
            .bind(aggregate)
            .bind(event_type)
            .bind(schemas::AVRO_CONTENT_TYPE)
            .bind(&self.payload)
            .bind(super::TRACEPARENT)
            .bind(n as i64)
            .execute(&self.pools[index])
            .await
            .context("filling the outbox")?;
            left -= n;
        }
        Ok(())
    }

    async fn pending(&self) -> anyhow::Result<i64> {
        let mut total = 0;
        for pool in &self.pools {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(pool)
                .await?;
            total += n;
        }
        Ok(total)
    }

    /// The lowest id left in each source's outbox: an index probe, where `count(*)` is a
    /// (parallel) scan of the whole table. Polled every few milliseconds during a drain,
    /// counting took more of the machine than the relay it measured.
    async fn lowest_ids(&self) -> anyhow::Result<Vec<Option<i64>>> {
        let mut lowest = Vec::new();
        for pool in &self.pools {
            lowest.push(
                sqlx::query_scalar("SELECT min(id) FROM outbox")
                    .fetch_one(pool)
                    .await?,
            );
        }
        Ok(lowest)
    }

    async fn wait_until_drained(&self, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.lowest_ids().await?.iter().all(Option::is_none) {
                return Ok(Instant::now());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the outbox still held {} rows after {timeout:?}; see {}",
                self.pending().await?,
                self.log_dir.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fills both outboxes with `rows` rows in all while the relay is stopped, starts it, and
    /// measures from its first delete (the lowest id left moves) to the last: rows per second.
    pub async fn drain(&mut self, rows: usize) -> anyhow::Result<(Value, Usage)> {
        self.stop_relay();
        super::progress(format!(
            "relay drain: filling both outboxes with {rows} rows"
        ));
        for index in 0..SOURCES.len() {
            self.fill(index, rows / SOURCES.len(), 10_000).await?;
        }
        let filled = self.pending().await?;
        let lowest = self.lowest_ids().await?;
        super::progress("relay drain: starting the relay on the full outbox");
        let launched = Instant::now();
        self.start_relay().await?;
        let watched = self.watched().await;
        let (times, usage) = resources::measure(&watched, async {
            let first = loop {
                if self.lowest_ids().await? != lowest {
                    break Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            let last = self.wait_until_drained(Duration::from_secs(600)).await?;
            anyhow::Ok((first, last))
        })
        .await;
        let (first, last) = times?;
        let draining = last - first;
        let rate = filled as f64 / draining.as_secs_f64();
        Ok((
            json!({
                "rows": filled,
                "seconds_from_first_delete_to_empty": super::secs(draining),
                "seconds_from_relay_start_to_empty": super::secs(last - launched),
                "rows_per_second": rate.round(),
                "resources": usage.json(),
            }),
            usage,
        ))
    }

    /// Offers `rate` rows a second (split over both sources, committed every 10 ms) for
    /// `duration` with the relay running, waits for the outbox to empty, and reads the relay's
    /// own commit→acknowledged histogram for what the window added.
    pub async fn latency_at(&mut self, rate: f64, duration: Duration) -> anyhow::Result<Value> {
        if self.relay.is_none() {
            self.start_relay().await?;
        }
        let this = &*self;
        let http = reqwest::Client::new();
        let metrics = |http: reqwest::Client| {
            let url = format!("{}/metrics", crate::url_of(&this.metrics));
            async move { anyhow::Ok(http.get(url).send().await?.text().await?) }
        };
        let before = metrics(http.clone()).await?;
        let started = Instant::now();
        let tick = Duration::from_millis(10);
        let mut inserted = [0usize; 2];
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while started.elapsed() < duration {
            ticker.tick().await;
            let due = (started.elapsed().as_secs_f64() * rate / 2.0) as usize;
            let fills = (0..SOURCES.len()).map(|i| {
                let n = due.saturating_sub(inserted[i]);
                async move {
                    if n > 0 {
                        this.fill(i, n, n).await?;
                    }
                    anyhow::Ok(n)
                }
            });
            for (i, n) in futures::future::try_join_all(fills)
                .await?
                .into_iter()
                .enumerate()
            {
                inserted[i] += n;
            }
        }
        let offered_for = started.elapsed();
        this.wait_until_drained(Duration::from_secs(300)).await?;
        // The histogram is updated when the acknowledgement is handled, just before the delete.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = metrics(http).await?;
        let name = "relay_commit_to_ack_seconds";
        // Both sources' series, summed.
        let before_buckets = stats::buckets(&before, name, &[]);
        let after_buckets = stats::buckets(&after, name, &[]);
        let (p50, n) = stats::histogram_quantile(&before_buckets, &after_buckets, 0.5);
        let (p99, _) = stats::histogram_quantile(&before_buckets, &after_buckets, 0.99);
        let total: usize = inserted.iter().sum();
        Ok(json!({
            "offered_per_second": rate,
            "achieved_per_second": (total as f64 / offered_for.as_secs_f64()).round(),
            "rows": total,
            "acknowledged_in_histogram": n,
            "commit_to_ack_p50_ms": stats::round(p50),
            "commit_to_ack_p99_ms": stats::round(p99),
        }))
    }
}

impl Drop for RelayBench {
    fn drop(&mut self) {
        self.stop_relay();
        crate::drop_databases(&self.server, self.databases.clone());
    }
}
