//! The job runner against a real Postgres: a job exists only if its transaction commits, runs
//! once when due however many runners compete, is retried with backoff and given up on with a
//! record and a metric, spends no attempt when it says "not now", and an attempt that outlives
//! its lease commits nothing.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use service_kit::backoff::Backoff;
use service_kit::jobs::{self, Completed, Job, JobError, JobHandler, JobKind, Runner};
use service_kit::shutdown::Shutdown;
use sqlx::PgPool;

const KIND: &str = "test-job";

/// A database of its own with the kit's tables, and a `job_log` table the handlers write their
/// effect to.
async fn database(name: &str) -> PgPool {
    let server = std::env::var("E2E_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let db = format!("jobs_{name}_{}", std::process::id());
    let admin = sqlx::PgPool::connect(&format!("{server}/postgres"))
        .await
        .expect("Postgres (scripts/test.sh starts it)");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let pool = service_kit::db::connect_and_migrate(&format!("{server}/{db}"), 10, &[])
        .await
        .expect("database");
    sqlx::query("CREATE TABLE job_log (key text NOT NULL, attempt int NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    pool
}

fn kind(max_attempts: u32, lease: Duration) -> JobKind {
    JobKind {
        kind: KIND,
        max_attempts,
        lease,
        backoff: Backoff {
            first: Duration::from_millis(20),
            max: Duration::from_millis(50),
        },
    }
}

fn runner(kind: JobKind, handler: impl JobHandler) -> Runner {
    Runner::default()
        .polling_every(Duration::from_millis(50))
        .with(kind, handler)
}

/// The process's metrics (each test binary installs its recorder once).
fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("recorder")
    })
}

/// Writes its effect (a `job_log` row) and completes, in one transaction; `fail_first` attempts
/// fail, and the first `slow_first` attempts take `slow` before they try to commit.
#[derive(Default)]
struct Logging {
    fail_first: u32,
    later_first: u32,
    slow_first: u32,
    slow: Duration,
    calls: Arc<AtomicU32>,
}

impl JobHandler for Logging {
    async fn run(&self, pool: &PgPool, job: &Job) -> Result<Completed, JobError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if call <= self.later_first {
            return Err(JobError::Later {
                after: Duration::from_millis(10),
                why: format!("not now (call {call})"),
            });
        }
        if job.attempt <= self.fail_first {
            return Err(JobError::Failed(anyhow::anyhow!(
                "the outside service said 503 (attempt {})",
                job.attempt
            )));
        }
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO job_log (key, attempt) VALUES ($1, $2)")
            .bind(&job.key)
            .bind(job.attempt as i32)
            .execute(&mut *tx)
            .await?;
        if job.attempt <= self.slow_first {
            tokio::time::sleep(self.slow).await;
        }
        let done = job.complete(&mut tx).await?;
        tx.commit().await?;
        Ok(done)
    }
}

async fn enqueue(pool: &PgPool, key: &str) -> bool {
    let mut tx = pool.begin().await.unwrap();
    let queued = jobs::enqueue(&mut tx, KIND, key, &serde_json::Value::Null, Duration::ZERO)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    queued
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done().await {
        assert!(Instant::now() < deadline, "{what} within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_exists_only_if_its_transaction_commits_and_runs_once() {
    let pool = database("commit").await;
    let mut tx = pool.begin().await.unwrap();
    jobs::enqueue(
        &mut tx,
        KIND,
        "rolled-back",
        &serde_json::Value::Null,
        Duration::ZERO,
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert!(enqueue(&pool, "committed").await);
    assert!(
        !enqueue(&pool, "committed").await,
        "the same kind and key again is a no-op"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM jobs").await, 1);

    let (stop, shutdown) = Shutdown::new();
    let running = tokio::spawn(
        runner(kind(3, Duration::from_secs(10)), Logging::default()).run(pool.clone(), shutdown),
    );
    wait_until("the job ran", async || {
        count(&pool, "SELECT count(*) FROM jobs").await == 0
    })
    .await;
    stop.fire();
    running.await.unwrap();
    let log: Vec<(String, i32)> = sqlx::query_as("SELECT key, attempt FROM job_log")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(log, [("committed".to_owned(), 1)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn three_runners_run_each_of_300_jobs_exactly_once() {
    let pool = database("compete").await;
    let mut tx = pool.begin().await.unwrap();
    for n in 0..300 {
        jobs::enqueue(
            &mut tx,
            KIND,
            &format!("job-{n}"),
            &serde_json::Value::Null,
            Duration::ZERO,
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    let (stop, shutdown) = Shutdown::new();
    let runners: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(
                runner(kind(3, Duration::from_secs(10)), Logging::default())
                    .run(pool.clone(), shutdown.clone()),
            )
        })
        .collect();
    wait_until("every job ran", async || {
        count(&pool, "SELECT count(*) FROM jobs").await == 0
    })
    .await;
    stop.fire();
    futures::future::join_all(runners).await;
    assert_eq!(count(&pool, "SELECT count(*) FROM job_log").await, 300);
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT key) FROM job_log").await,
        300
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_job_is_retried_then_given_up_on_with_a_record_and_a_metric() {
    let metrics = metrics();
    let pool = database("give_up").await;
    assert!(enqueue(&pool, "hopeless").await);
    assert!(enqueue(&pool, "recovers").await);
    let (stop, shutdown) = Shutdown::new();
    // "hopeless" fails every attempt; "recovers" fails its first two of three.
    struct Mixed(Logging, Logging);
    impl JobHandler for Mixed {
        async fn run(&self, pool: &PgPool, job: &Job) -> Result<Completed, JobError> {
            if job.key == "hopeless" {
                self.0.run(pool, job).await
            } else {
                self.1.run(pool, job).await
            }
        }
    }
    let handler = Mixed(
        Logging {
            fail_first: u32::MAX,
            ..Logging::default()
        },
        Logging {
            fail_first: 2,
            ..Logging::default()
        },
    );
    let running =
        tokio::spawn(runner(kind(3, Duration::from_secs(10)), handler).run(pool.clone(), shutdown));
    wait_until(
        "the hopeless job was given up on and the other done",
        async || {
            count(
                &pool,
                "SELECT count(*) FROM jobs WHERE failed_at IS NOT NULL",
            )
            .await
                == 1
                && count(&pool, "SELECT count(*) FROM job_log").await == 1
        },
    )
    .await;
    stop.fire();
    running.await.unwrap();
    let (key, attempts, error): (String, i32, String) =
        sqlx::query_as("SELECT key, attempts, last_error FROM jobs")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((key.as_str(), attempts), ("hopeless", 3));
    assert!(error.contains("503 (attempt 3)"), "{error}");
    let recovered: i32 = sqlx::query_scalar("SELECT attempt FROM job_log WHERE key = 'recovers'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(recovered, 3, "it succeeded on its third attempt");
    let text = metrics.render();
    assert!(
        text.contains("jobs_given_up_total{kind=\"test-job\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn not_now_spends_no_attempt() {
    let pool = database("later").await;
    assert!(enqueue(&pool, "waits").await);
    let calls = Arc::new(AtomicU32::new(0));
    let handler = Logging {
        later_first: 5,
        calls: calls.clone(),
        ..Logging::default()
    };
    let (stop, shutdown) = Shutdown::new();
    // One attempt allowed: five "not now"s must not use it up.
    let running =
        tokio::spawn(runner(kind(1, Duration::from_secs(10)), handler).run(pool.clone(), shutdown));
    wait_until("the job ran", async || {
        count(&pool, "SELECT count(*) FROM job_log").await == 1
    })
    .await;
    stop.fire();
    running.await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    assert_eq!(count(&pool, "SELECT count(*) FROM jobs").await, 0);
    assert_eq!(
        count(&pool, "SELECT attempt::bigint FROM job_log").await,
        1,
        "it ran on its first attempt"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attempt_that_outlives_its_lease_commits_nothing_and_the_job_runs_again() {
    let pool = database("lease").await;
    assert!(enqueue(&pool, "slow").await);
    let handler = Logging {
        slow_first: 1,
        slow: Duration::from_secs(3),
        ..Logging::default()
    };
    let (stop, shutdown) = Shutdown::new();
    let running = tokio::spawn(
        runner(kind(3, Duration::from_millis(500)), handler).run(pool.clone(), shutdown),
    );
    wait_until("the job ran", async || {
        count(&pool, "SELECT count(*) FROM jobs").await == 0
    })
    .await;
    stop.fire();
    running.await.unwrap();
    let log: Vec<i32> = sqlx::query_scalar("SELECT attempt FROM job_log")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(log, [2], "only the second attempt's effect committed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_woken_runner_runs_a_new_job_at_once_rather_than_at_its_next_poll() {
    let pool = database("wake").await;
    let runner = Runner::default()
        .polling_every(Duration::from_secs(3600))
        .with(kind(3, Duration::from_secs(10)), Logging::default());
    let wake = runner.wake();
    let (stop, shutdown) = Shutdown::new();
    assert!(enqueue(&pool, "first").await);
    let running = tokio::spawn(runner.run(pool.clone(), shutdown));
    let ran = async |key: &str| {
        count(
            &pool,
            &format!("SELECT count(*) FROM job_log WHERE key = '{key}'"),
        )
        .await
            == 1
    };
    // The first job runs at the runner's first look; then it sleeps for its hour-long poll.
    wait_until("the first job ran", async || ran("first").await).await;
    assert!(enqueue(&pool, "second").await);
    wake.now();
    wait_until(
        "the second job ran, within a minute of the wake",
        async || ran("second").await,
    )
    .await;
    stop.fire();
    running.await.unwrap();
}
