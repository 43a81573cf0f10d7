//! The job runner: work that must happen outside a consumer's transaction (a call to an outside
//! HTTP API) or later (a step's timeout), kept in the service's own database (`jobs`).
//!
//! - **Enqueued with the change that needs it**: [`enqueue`] takes the caller's transaction, so
//!   a job exists if and only if the business change commits. One job per `(kind, key)`:
//!   enqueuing it again is a no-op, so a redelivered message cannot double it.
//! - **Claimed by any instance**: a runner takes due jobs `FOR UPDATE SKIP LOCKED`, stamps each
//!   with a claim token and moves its `run_at` to the end of its lease, and commits. A runner
//!   that dies mid-job frees it when the lease runs out; no transaction stays open while the job
//!   calls out.
//! - **Done in one transaction with its effect**: the handler writes what the job did and calls
//!   [`Job::complete`] in the same transaction, which deletes the job only if the claim is still
//!   this runner's (a job whose lease ran out and that another runner took completes nothing
//!   here: [`JobError::LostClaim`] rolls the effect back). A handler can only return success
//!   through [`Completed`], which only [`Job::complete`] makes.
//! - **Retried with backoff, given up after a bound**: a failure spends an attempt and waits
//!   [`JobKind::backoff`]; after [`JobKind::max_attempts`] (or a [`JobError::Permanent`]) the job
//!   is given up on: its row stays with `failed_at` and `last_error` as the record, it is logged
//!   as an error and counted in `jobs_given_up_total{kind}`, and the retention job prunes it
//!   after `--dlq-retention`. A [`JobError::Later`] ("not now": an open circuit breaker, a
//!   deadline moved later) spends no attempt.
//!
//! Jobs run at least once: a runner can die after the effect of a call but before the commit, so
//! a job's work must be idempotent (an outside call carries an idempotency key; a database effect
//! rechecks the state it acts on under a lock).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use metrics::{counter, histogram};
use sqlx::{PgConnection, PgPool};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::shutdown::Shutdown;

/// Puts a job on the queue in the caller's transaction, to run once `delay` has passed. Returns
/// `false` when a job of this kind and key is already queued (or was given up on): nothing
/// changes.
pub async fn enqueue(
    conn: &mut PgConnection,
    kind: &str,
    key: &str,
    payload: &serde_json::Value,
    delay: Duration,
) -> sqlx::Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO jobs (id, kind, key, payload, run_at) \
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) \
         ON CONFLICT (kind, key) DO NOTHING",
    )
    .bind(Uuid::now_v7())
    .bind(kind)
    .bind(key)
    .bind(payload)
    .bind(delay.as_secs_f64())
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Makes a queued job of this kind and key due within `delay` if it was due later (work that
/// became urgent). A job a runner holds now is left alone: it is running. Returns whether one
/// was moved.
pub async fn due_within(
    conn: &mut PgConnection,
    kind: &str,
    key: &str,
    delay: Duration,
) -> sqlx::Result<bool> {
    let moved = sqlx::query(
        "UPDATE jobs SET run_at = now() + make_interval(secs => $3) \
         WHERE kind = $1 AND key = $2 AND failed_at IS NULL AND claim IS NULL \
             AND run_at > now() + make_interval(secs => $3)",
    )
    .bind(kind)
    .bind(key)
    .bind(delay.as_secs_f64())
    .execute(conn)
    .await?
    .rows_affected();
    Ok(moved > 0)
}

/// Takes a queued job of this kind and key off the queue in the caller's transaction (its work
/// is no longer needed: the step it times out has ended). A job given up on stays as the record.
/// Returns whether one was queued.
pub async fn cancel(conn: &mut PgConnection, kind: &str, key: &str) -> sqlx::Result<bool> {
    let deleted =
        sqlx::query("DELETE FROM jobs WHERE kind = $1 AND key = $2 AND failed_at IS NULL")
            .bind(kind)
            .bind(key)
            .execute(conn)
            .await?
            .rows_affected();
    Ok(deleted > 0)
}

/// A claimed job, as its handler sees it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: Uuid,
    pub kind: String,
    pub key: String,
    pub payload: serde_json::Value,
    /// This attempt's number, from 1.
    pub attempt: u32,
    pub created_at: DateTime<Utc>,
    claim: Uuid,
}

/// Proof that a job was completed in its handler's transaction ([`Job::complete`]).
#[derive(Debug)]
#[must_use = "return it from the handler once the transaction has committed"]
pub struct Completed(());

impl Job {
    /// Deletes the job in the caller's transaction, which should hold the job's effect: the
    /// effect commits if and only if the job is done. [`JobError::LostClaim`] when the job is
    /// no longer this runner's (its lease ran out and another runner took it): roll back.
    pub async fn complete(&self, conn: &mut PgConnection) -> Result<Completed, JobError> {
        let deleted = sqlx::query("DELETE FROM jobs WHERE id = $1 AND claim = $2")
            .bind(self.id)
            .bind(self.claim)
            .execute(conn)
            .await?
            .rows_affected();
        if deleted == 1 {
            Ok(Completed(()))
        } else {
            Err(JobError::LostClaim)
        }
    }
}

/// Why a job did not complete this time.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// It failed (a timeout, a 5xx, a database error): try again after the kind's backoff. It
    /// spends an attempt.
    #[error("{0:#}")]
    Failed(anyhow::Error),
    /// Not now, and not the job's fault (the outside service's circuit breaker is open, or it
    /// is not due yet under the current settings): try again after `after`, spending no attempt.
    #[error("not now ({why}); again in {after:?}")]
    Later { after: Duration, why: String },
    /// It can never succeed: give up on it now.
    #[error("{0}")]
    Permanent(String),
    /// Another runner holds the job now; this attempt's effect must not commit.
    #[error("the job's claim ran out and another runner took it")]
    LostClaim,
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        JobError::Failed(e.into())
    }
}

/// What a service gives the runner for one kind of job.
pub trait JobHandler: Send + Sync + 'static {
    /// Does the job's work and completes it ([`Job::complete`]) in the transaction that writes
    /// its effect. Runs with no transaction open; uses `pool` for its own.
    fn run(
        &self,
        pool: &PgPool,
        job: &Job,
    ) -> impl Future<Output = Result<Completed, JobError>> + Send;
}

/// How one kind of job is run.
#[derive(Debug, Clone)]
pub struct JobKind {
    pub kind: &'static str,
    /// Attempts before the job is given up on.
    pub max_attempts: u32,
    /// How long a runner holds a claimed job before another may take it. An attempt still
    /// running then is abandoned (it failed: it took longer than its lease).
    pub lease: Duration,
    /// The wait after each failed attempt.
    pub backoff: Backoff,
}

type RunFn = dyn Fn(PgPool, Job) -> Pin<Box<dyn Future<Output = Result<Completed, JobError>> + Send>>
    + Send
    + Sync;

struct Registered {
    kind: JobKind,
    run: Arc<RunFn>,
}

/// The runner of a service's jobs: one loop for every kind, running at most `concurrency` jobs
/// at once.
pub struct Runner {
    kinds: HashMap<&'static str, Registered>,
    /// The most jobs running at once.
    concurrency: usize,
    /// How often the queue is looked at when it had nothing due.
    poll: Duration,
    wake: Wake,
}

/// Makes a runner look for due jobs now rather than at its next poll: what a service calls after
/// committing a transaction that enqueued a job due at once, so that the job starts within
/// milliseconds instead of up to a poll later. Wakes that come while the runner is busy merge into
/// one look. Other instances' runners find the job at their next poll.
#[derive(Debug, Clone, Default)]
pub struct Wake(Arc<tokio::sync::Notify>);

impl Wake {
    pub fn now(&self) {
        self.0.notify_one();
    }
}

impl Default for Runner {
    fn default() -> Self {
        Runner {
            kinds: HashMap::new(),
            concurrency: 8,
            poll: Duration::from_secs(1),
            wake: Wake::default(),
        }
    }
}

impl Runner {
    /// Adds a kind of job and its handler.
    pub fn with<H: JobHandler>(mut self, kind: JobKind, handler: H) -> Self {
        let handler = Arc::new(handler);
        let run: Arc<RunFn> = Arc::new(move |pool, job| {
            let handler = handler.clone();
            Box::pin(async move { handler.run(&pool, &job).await })
        });
        self.kinds.insert(kind.kind, Registered { kind, run });
        self
    }

    /// Looks at the queue every `poll` when it had nothing due (default 1 s: a job runs at most
    /// about that long after it is due).
    pub fn polling_every(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// The handle that makes this runner look for due jobs at once ([`Wake`]).
    pub fn wake(&self) -> Wake {
        self.wake.clone()
    }

    /// Runs due jobs until `shutdown`; the jobs running then are abandoned (their claims run
    /// out and they run again).
    pub async fn run(self, pool: PgPool, shutdown: Shutdown) {
        if self.kinds.is_empty() {
            return;
        }
        let kinds: Vec<&'static str> = self.kinds.keys().copied().collect();
        for kind in &kinds {
            counter!("jobs_given_up_total", "kind" => *kind).absolute(0);
        }
        tracing::info!(?kinds, concurrency = self.concurrency, poll = ?self.poll, "job runner started");
        let runner = Arc::new(self);
        let mut running = JoinSet::new();
        let mut failures = 0;
        'runner: loop {
            let free = runner.concurrency.saturating_sub(running.len());
            let mut more_due = free == 0;
            if free > 0 {
                match claim(&pool, &runner.kinds, free).await {
                    Ok(jobs) => {
                        failures = 0;
                        // Every free slot filled: more may be due.
                        more_due = jobs.len() == free;
                        for job in jobs {
                            running.spawn(runner.clone().attempt(pool.clone(), job));
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        let delay = crate::backoff::transient(failures);
                        tracing::warn!(error = %e, ?delay, "could not look for due jobs; trying again");
                        if shutdown.sleep(delay).await.is_err() {
                            break;
                        }
                        continue;
                    }
                }
            }
            if more_due {
                // Look again as soon as a slot frees up.
                tokio::select! {
                    _ = running.join_next() => continue,
                    _ = shutdown.wait() => break,
                }
            }
            // Nothing more due now: look again after the poll interval or when woken, reaping
            // the jobs that end meanwhile.
            let pause = shutdown.sleep(runner.poll);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    slept = &mut pause => if slept.is_err() { break 'runner } else { break },
                    () = runner.wake.0.notified() => break,
                    Some(_) = running.join_next() => {}
                }
            }
        }
        running.abort_all();
        tracing::info!("job runner stopped");
    }

    /// Runs one claimed job and records what came of it.
    async fn attempt(self: Arc<Self>, pool: PgPool, job: Job) {
        let Some(registered) = self.kinds.get(job.kind.as_str()) else {
            return;
        };
        let kind = &registered.kind;
        let started = Instant::now();
        let outcome = tokio::time::timeout(kind.lease, (registered.run)(pool.clone(), job.clone()))
            .await
            .unwrap_or_else(|_| {
                Err(JobError::Failed(anyhow::anyhow!(
                    "the attempt took longer than the job's lease ({:?})",
                    kind.lease
                )))
            });
        histogram!("job_duration_seconds", "kind" => kind.kind)
            .record(started.elapsed().as_secs_f64());
        let (label, result) = match outcome {
            Ok(Completed(())) => {
                tracing::debug!(kind = kind.kind, key = %job.key, attempt = job.attempt, "job done");
                ("completed", Ok(()))
            }
            Err(JobError::LostClaim) => {
                tracing::warn!(kind = kind.kind, key = %job.key, "a job's claim ran out while it ran; another runner has it");
                ("lost_claim", Ok(()))
            }
            Err(JobError::Later { after, why }) => {
                ("later", reschedule(&pool, &job, after, &why, false).await)
            }
            Err(JobError::Failed(e)) if job.attempt < kind.max_attempts => {
                let delay = kind.backoff.delay(job.attempt);
                let why = crate::text::truncate_chars(format!("{e:#}"), 1_000);
                tracing::warn!(kind = kind.kind, key = %job.key, attempt = job.attempt, max_attempts = kind.max_attempts,
                    ?delay, error = %why, "a job failed; trying again later");
                ("failed", reschedule(&pool, &job, delay, &why, true).await)
            }
            // Its last attempt failed, or it can never succeed.
            Err(e) => {
                let why = crate::text::truncate_chars(e.to_string(), 1_000);
                let given_up = give_up(&pool, &job, &why).await;
                if given_up.is_ok() {
                    counter!("jobs_given_up_total", "kind" => kind.kind).increment(1);
                    tracing::error!(kind = kind.kind, key = %job.key, attempts = job.attempt, error = %why,
                        "gave up on a job; its row stays in the jobs table with failed_at and last_error");
                }
                ("given_up", given_up)
            }
        };
        counter!("jobs_attempts_total", "kind" => kind.kind, "outcome" => label).increment(1);
        if let Err(e) = result {
            tracing::warn!(kind = kind.kind, key = %job.key, error = %e,
                "could not record a job's attempt; it runs again when its claim runs out");
        }
    }
}

/// Claims up to `limit` due jobs of the registered kinds, oldest due first, in one committed
/// statement.
async fn claim(
    pool: &PgPool,
    kinds: &HashMap<&'static str, Registered>,
    limit: usize,
) -> sqlx::Result<Vec<Job>> {
    let names: Vec<&str> = kinds.keys().copied().collect();
    let leases: Vec<f64> = names
        .iter()
        .map(|k| kinds[k].kind.lease.as_secs_f64())
        .collect();
    let claim = Uuid::new_v4();
    let rows: Vec<(Uuid, String, String, serde_json::Value, i32, DateTime<Utc>)> = sqlx::query_as(
        "WITH due AS ( \
             SELECT id FROM jobs \
             WHERE kind = ANY($1) AND failed_at IS NULL AND run_at <= now() \
             ORDER BY run_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
         lease AS (SELECT * FROM unnest($1::text[], $3::float8[]) AS l(kind, secs)) \
         UPDATE jobs SET claim = $4, attempts = attempts + 1, \
             run_at = now() + make_interval(secs => lease.secs) \
         FROM due, lease WHERE jobs.id = due.id AND lease.kind = jobs.kind \
         RETURNING jobs.id, jobs.kind, jobs.key, jobs.payload, jobs.attempts, jobs.created_at",
    )
    .bind(&names)
    .bind(limit as i64)
    .bind(&leases)
    .bind(claim)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, kind, key, payload, attempts, created_at)| Job {
            id,
            kind,
            key,
            payload,
            attempt: attempts.max(1) as u32,
            created_at,
            claim,
        })
        .collect())
}

/// Frees a claimed job to run again after `after`; `spent` says whether the attempt counts.
async fn reschedule(
    pool: &PgPool,
    job: &Job,
    after: Duration,
    why: &str,
    spent: bool,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE jobs SET claim = NULL, run_at = now() + make_interval(secs => $3), \
             last_error = $4, attempts = attempts - CASE WHEN $5 THEN 0 ELSE 1 END \
         WHERE id = $1 AND claim = $2",
    )
    .bind(job.id)
    .bind(job.claim)
    .bind(after.as_secs_f64())
    .bind(why)
    .bind(spent)
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks a claimed job as given up on, keeping it as the record.
async fn give_up(pool: &PgPool, job: &Job, why: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE jobs SET claim = NULL, failed_at = now(), last_error = $3 \
         WHERE id = $1 AND claim = $2",
    )
    .bind(job.id)
    .bind(job.claim)
    .bind(why)
    .execute(pool)
    .await?;
    Ok(())
}

/// Describes the runner's metrics.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        "jobs_attempts_total",
        "Job attempts by kind and outcome: completed, failed (tried again later), later (not now, no attempt spent), given_up, lost_claim (its lease ran out while it ran)"
    );
    describe_counter!(
        "jobs_given_up_total",
        "Jobs given up on after their last attempt or a permanent failure, by kind; each stays in the jobs table with failed_at and last_error"
    );
    describe_histogram!(
        "job_duration_seconds",
        Unit::Seconds,
        "Time one job attempt took, by kind"
    );
}
