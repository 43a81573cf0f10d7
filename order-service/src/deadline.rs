//! The saga deadline: an order still PENDING after the deadline is cancelled with reason
//! DEADLINE_EXCEEDED, exactly as a customer cancel would (OrderCancelled, then inventory releases
//! whatever it reserved). The deadline is data, not a timer: placing an order enqueues a
//! `saga-deadline` job for it on the service's job runner ([`service_kit::jobs`]) in the same
//! transaction, due when the deadline passes, and the order leaving PENDING takes the job off the
//! queue in the transaction of that change ([`transition::apply`]). So it survives restarts, and
//! any of several order-service instances may run it: the job locks the order's row and
//! re-decides through the state machine, so an order is never cancelled twice.
//!
//! The job checks the deadline again when it runs, against the current `--saga-deadline`: a
//! deadline made longer since the order was placed moves the job later; one made shorter takes
//! effect for the orders placed after the change.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use messaging::outbox::Cause;
use schemas::CancelReason;
use service_kit::jobs::{self, Completed, Job, JobError, JobHandler, JobKind};
use service_kit::shutdown::Shutdown;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::{Input, OrderStatus};
use crate::store;
use crate::transition::{self, Applied};

/// The job kind of a saga deadline; its key is the order id.
pub const KIND: &str = "saga-deadline";

/// How often the orders still in flight are counted ([`measure_in_flight`]).
const MEASURE_EVERY: Duration = Duration::from_secs(5);

/// Starts the deadline of a new order (in the transaction that places it).
pub async fn start(
    conn: &mut PgConnection,
    order_id: Uuid,
    deadline: Duration,
) -> sqlx::Result<()> {
    jobs::enqueue(
        conn,
        KIND,
        &order_id.to_string(),
        &serde_json::Value::Null,
        deadline,
    )
    .await?;
    Ok(())
}

/// Ends the deadline of an order that left PENDING (in the transaction of that change).
pub async fn stop(conn: &mut PgConnection, order_id: Uuid) -> sqlx::Result<()> {
    jobs::cancel(conn, KIND, &order_id.to_string()).await?;
    Ok(())
}

/// How the job runner runs deadlines: a failure (the database away) is tried again from 1 s
/// to 1 min for about an hour; an order whose deadline job was given up on stays PENDING and
/// shows in `orders_in_flight_oldest_age_seconds` and `jobs_given_up_total`.
pub fn kind() -> JobKind {
    JobKind {
        kind: KIND,
        max_attempts: 60,
        lease: Duration::from_secs(30),
        backoff: service_kit::backoff::Backoff {
            first: Duration::from_secs(1),
            max: Duration::from_secs(60),
        },
    }
}

/// Cancels an order whose deadline passed while it was PENDING.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// `--saga-deadline`.
    pub deadline: Duration,
}

impl JobHandler for Deadline {
    async fn run(&self, pool: &PgPool, job: &Job) -> Result<Completed, JobError> {
        let order_id = Uuid::parse_str(&job.key)
            .map_err(|e| JobError::Permanent(format!("the job's key is not an order id: {e}")))?;
        let mut tx = pool.begin().await?;
        let order = store::lock_for_deadline(&mut tx, order_id).await?;
        let pending = matches!(order, Some((OrderStatus::Pending, _)));
        if let Some((OrderStatus::Pending, created_at)) = order
            && let Some(wait) = self.time_left(created_at)
        {
            return Err(JobError::Later {
                after: wait,
                why: "the saga deadline is longer than when the order was placed".into(),
            });
        }
        // Completed first: leaving PENDING takes the order's deadline job (this one) off the queue.
        let done = job.complete(&mut tx).await?;
        let cancelled = if pending {
            cancel(&mut tx, order_id).await?
        } else {
            None
        };
        tx.commit().await?;
        if let Some(saga) = cancelled {
            saga.record();
            tracing::info!(%order_id, deadline = ?self.deadline, "order still PENDING after the saga deadline; cancelled it");
        }
        Ok(done)
    }
}

impl Deadline {
    /// How long until the deadline of an order placed at `created_at` passes, under the current
    /// `--saga-deadline`; `None` once it has.
    fn time_left(&self, created_at: DateTime<Utc>) -> Option<Duration> {
        let due = TimeDelta::from_std(self.deadline)
            .ok()
            .and_then(|deadline| created_at.checked_add_signed(deadline));
        match due {
            // A deadline past the end of time: look again in an hour.
            None => Some(Duration::from_secs(3600)),
            Some(due) => (due - Utc::now()).to_std().ok().filter(|w| !w.is_zero()),
        }
    }
}

/// Cancels the PENDING order (DEADLINE_EXCEEDED) as the state machine says; what to record
/// once the transaction commits.
async fn cancel(
    tx: &mut PgConnection,
    order_id: Uuid,
) -> sqlx::Result<Option<transition::SagaMetrics>> {
    // Each deadline cancellation starts a trace of its own; the order's events follow it.
    let span = tracing::info_span!("saga deadline", otel.name = "cancel overdue order",
        order_id = %order_id, trace_id = tracing::field::Empty);
    service_kit::trace_context::continue_from(&span, None);
    let cause = Cause {
        traceparent: Some(service_kit::trace_context::of(&span)),
        ..Cause::default()
    };
    let input = Input::CancelRequested {
        reason: CancelReason::DeadlineExceeded,
    };
    Ok(
        match transition::apply(tx, order_id, OrderStatus::Pending, &input, &cause).await? {
            Ok(Applied::Changed { saga, .. }) => Some(saga),
            _ => None,
        },
    )
}

/// Measures the orders in flight every [`MEASURE_EVERY`] until shutdown.
pub async fn measure(pool: PgPool, shutdown: Shutdown) {
    loop {
        if let Err(e) = measure_in_flight(&pool).await {
            tracing::warn!(error = %e, "could not count the orders in flight; trying again later");
        }
        if shutdown.sleep(MEASURE_EVERY).await.is_err() {
            return;
        }
    }
}

/// Sets `orders_in_flight{status}` and `orders_in_flight_oldest_age_seconds{status}` (time since
/// the oldest one's last change) for every status whose saga is not over. No deadline covers a
/// CANCELLING order whose OrderCancelled or StockReleased was dead-lettered: these gauges (and the
/// OrdersStuckInFlight alert on them) are how such an order becomes visible.
pub async fn measure_in_flight(pool: &PgPool) -> sqlx::Result<()> {
    let in_flight: Vec<&str> = OrderStatus::ALL
        .iter()
        .filter(|s| !s.is_terminal())
        .map(|s| s.as_str())
        .collect();
    let rows: Vec<(String, i64, Option<f64>)> = sqlx::query_as(
        "SELECT status, count(*), EXTRACT(EPOCH FROM clock_timestamp() - min(updated_at))::float8 \
         FROM orders WHERE status = ANY($1) GROUP BY status",
    )
    .bind(&in_flight)
    .fetch_all(pool)
    .await?;
    for status in in_flight {
        let (count, oldest) = rows
            .iter()
            .find(|(s, _, _)| s == status)
            .map_or((0, 0.0), |(_, n, age)| (*n, age.unwrap_or(0.0)));
        metrics::gauge!("orders_in_flight", "status" => status).set(count as f64);
        metrics::gauge!("orders_in_flight_oldest_age_seconds", "status" => status).set(oldest);
    }
    Ok(())
}

/// Describes the orders-in-flight gauges.
pub fn describe_metrics() {
    use metrics::{Unit, describe_gauge};
    describe_gauge!(
        "orders_in_flight",
        "Orders whose saga is not over, by status (PENDING, CANCELLING); counted every 5 s"
    );
    describe_gauge!(
        "orders_in_flight_oldest_age_seconds",
        Unit::Seconds,
        "Time since the last change of the oldest order in each in-flight status"
    );
}
