//! What the machine can do without the system in the way: how fast the broker takes
//! outbox-sized records from an idempotent `acks=all` producer, and how many small transactions
//! Postgres commits per second at the services' concurrency.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use sqlx::{Connection, PgConnection};

/// Records per second an idempotent producer with the relay's settings (`enable.idempotence`,
/// `acks=all`, `enable.gapless.guarantee`, `linger.ms=1`, plus `extra`) gets acknowledged by
/// the broker: `records` records of `payload` with the saga's six headers, random order ids as
/// keys, to a new topic of `partitions` partitions.
pub async fn produce_rate(
    bootstrap: &str,
    extra: &[(&str, &str)],
    records: usize,
    payload: &[u8],
    partitions: i32,
) -> anyhow::Result<f64> {
    let kafka = messaging::kafka::KafkaSettings::new(bootstrap);
    let topic = format!(
        "bench-ceiling-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    messaging::kafka::ensure_topics(
        &kafka,
        &[messaging::kafka::TopicSpec::new(
            topic.clone(),
            Duration::from_secs(3600),
        )],
        partitions,
    )
    .await?;
    let mut config = kafka.producer();
    for (k, v) in extra {
        config.set(*k, *v);
    }
    let producer: FutureProducer = config.create().context("creating the producer")?;
    // Connected and given a producer id before the clock starts.
    send_all(&producer, &topic, 10, payload).await?;
    let started = Instant::now();
    send_all(&producer, &topic, records, payload).await?;
    Ok(records as f64 / started.elapsed().as_secs_f64())
}

async fn send_all(
    producer: &FutureProducer,
    topic: &str,
    records: usize,
    payload: &[u8],
) -> anyhow::Result<()> {
    let mut pending = VecDeque::new();
    // The relay's headers, from a row like the ones it publishes.
    let row = outbox_relay::outbox::OutboxRow {
        id: 0,
        message_id: uuid::Uuid::new_v4(),
        aggregate_type: schemas::events::AGGREGATES[0].to_owned(),
        aggregate_id: uuid::Uuid::new_v4().to_string(),
        event_type: "OrderPlaced".to_owned(),
        content_type: schemas::AVRO_CONTENT_TYPE.to_owned(),
        payload: Vec::new(),
        causation_id: Some(uuid::Uuid::new_v4()),
        traceparent: Some(super::TRACEPARENT.to_owned()),
        tracestate: None,
        created_at: chrono::Utc::now(),
    };
    for _ in 0..records {
        let key = uuid::Uuid::new_v4().to_string();
        let headers = row.kafka_headers(super::TRACEPARENT);
        let mut record = FutureRecord::to(topic)
            .key(key.as_str())
            .payload(payload)
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push_back(delivery);
                    break;
                }
                Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    record = back;
                    // The local queue is full: wait for the oldest acknowledgement.
                    if let Some(oldest) = pending.pop_front() {
                        check(oldest.await)?;
                    } else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                Err((e, _)) => anyhow::bail!("producing: {e}"),
            }
        }
    }
    for delivery in pending {
        check(delivery.await)?;
    }
    Ok(())
}

fn check(
    report: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> anyhow::Result<()> {
    match report {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => anyhow::bail!("delivery failed: {e}"),
        Err(_) => anyhow::bail!("delivery canceled"),
    }
}

/// Transactions per second: `clients` connections each committing a one-row INSERT in a loop for
/// `duration`, in a database of their own (created on `server`, dropped afterwards).
pub async fn commit_rate(server: &str, clients: usize, duration: Duration) -> anyhow::Result<f64> {
    in_scratch_database(server, "bench_commits", |db| async move {
        let url = crate::db_url(server, &db);
        let mut conn = PgConnection::connect(&url).await?;
        sqlx::query(
            "CREATE TABLE commits (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
             payload BYTEA NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
        )
        .execute(&mut conn)
        .await?;
        let deadline = Instant::now() + duration;
        let started = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move {
                    let mut conn = PgConnection::connect(&url).await?;
                    let mut done = 0u64;
                    while Instant::now() < deadline {
                        sqlx::query("INSERT INTO commits (payload) VALUES ($1)")
                            .bind(&[7u8; 100][..])
                            .execute(&mut conn)
                            .await?;
                        done += 1;
                    }
                    anyhow::Ok(done)
                })
            })
            .collect();
        let mut total = 0;
        for task in tasks {
            total += task.await??;
        }
        anyhow::Ok(total as f64 / started.elapsed().as_secs_f64())
    })
    .await
}

/// Runs `work` with a database of its own on `server`, named `<prefix>_<random>`, and drops the
/// database afterwards, whatever `work` returned.
async fn in_scratch_database<T, Fut>(
    server: &str,
    prefix: &str,
    work: impl FnOnce(String) -> Fut,
) -> anyhow::Result<T>
where
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let db = format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut admin = PgConnection::connect(&crate::db_url(server, "postgres")).await?;
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await?;
    let result = work(db.clone()).await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await;
    result
}

/// `pgbench`: on this machine's PATH, or Debian's server package.
pub fn pgbench_binary() -> Option<PathBuf> {
    crate::which("pgbench").or_else(|| {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin/pgbench"))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        found.pop()
    })
}

/// The standard TPC-B-like transaction of `pgbench` (scale 10, so that 8 clients do not all
/// update one branch row), `clients` clients on 2 threads for `duration`: its reported tps.
pub async fn pgbench_tps(server: &str, clients: usize, duration: Duration) -> anyhow::Result<f64> {
    let pgbench =
        pgbench_binary().context("pgbench not found (Debian's postgresql package has it)")?;
    let host_port = crate::host_port_of(server);
    let (host, port) = host_port.rsplit_once(':').unwrap_or((&host_port, "5432"));
    let user = server
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split_once('@'))
        .map(|(user, _)| user.split(':').next().unwrap_or(user).to_owned())
        .unwrap_or_else(|| "postgres".into());
    let common = ["-h", host, "-p", port, "-U", &user];
    let run = |args: Vec<String>| {
        let pgbench = pgbench.clone();
        async move {
            let output = tokio::process::Command::new(&pgbench)
                .args(&args)
                .output()
                .await
                .context("running pgbench")?;
            anyhow::ensure!(
                output.status.success(),
                "pgbench {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            anyhow::Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        }
    };
    in_scratch_database(server, "bench_pgbench", |db| async move {
        let mut init: Vec<String> = common.iter().map(|s| s.to_string()).collect();
        init.extend(["-i", "-q", "-s", "10", &db].map(String::from));
        run(init).await?;
        let mut bench: Vec<String> = common.iter().map(|s| s.to_string()).collect();
        bench.extend([
            "-n".to_owned(),
            "-c".to_owned(),
            clients.to_string(),
            "-j".to_owned(),
            "2".to_owned(),
            "-T".to_owned(),
            duration.as_secs().max(1).to_string(),
            db.clone(),
        ]);
        let out = run(bench).await?;
        out.lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no tps in pgbench's output: {out}"))
    })
    .await
}
