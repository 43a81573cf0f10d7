//! The saga's step timeouts: an order still PENDING after `--reservation-timeout` is cancelled
//! with reason DEADLINE_EXCEEDED, exactly as a customer cancel would (OrderCancelled, then
//! inventory releases whatever it reserved); an order still AWAITING_PAYMENT after
//! `--payment-timeout` is cancelled with reason PAYMENT_TIMEOUT, which asks for the refund first
//! (REFUNDING, OrderRefundRequested: the charge may be in flight), then the stock. REFUNDING and
//! CANCELLING have no timeout: compensations retry until they are done, and the orders waiting in
//! them show in `orders_in_flight_oldest_age_seconds` (and the OrdersStuckInFlight alert).
//!
//! A timeout is data, not a timer: entering a step enqueues a job for it on the service's job
//! runner ([`service_kit::jobs`]) in the transaction of that change, due when the step's time is
//! up, and leaving the step takes the job off the queue in the transaction of that change
//! ([`follow`]). So it survives restarts, and any of several order-service instances may run it:
//! the job locks the order's row and re-decides through the state machine, so an order is never
//! cancelled twice.
//!
//! The job checks the timeout again when it runs, against the current setting: a timeout made
//! longer since the step began moves the job later; one made shorter takes effect for the steps
//! that begin after the change.

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
use crate::transition::{self, Applied, Steps};

/// How often the orders still in flight are counted ([`measure_in_flight`]).
const MEASURE_EVERY: Duration = Duration::from_secs(5);

/// A step of the saga that has a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// PENDING: inventory reserves the stock.
    Reservation,
    /// AWAITING_PAYMENT: payment-service charges the processor.
    Payment,
}

impl Step {
    /// The job kind of the step's timeout; its key is the order id. (`saga-deadline` is the
    /// reservation's: the name the jobs queued before the payment step keep.)
    pub fn kind(self) -> &'static str {
        match self {
            Step::Reservation => "saga-deadline",
            Step::Payment => "payment-deadline",
        }
    }

    /// The status an order is in during the step.
    fn status(self) -> OrderStatus {
        match self {
            Step::Reservation => OrderStatus::Pending,
            Step::Payment => OrderStatus::AwaitingPayment,
        }
    }

    /// The step an order in `status` is in, if that step has a timeout.
    fn of(status: OrderStatus) -> Option<Step> {
        [Step::Reservation, Step::Payment]
            .into_iter()
            .find(|step| step.status() == status)
    }

    fn reason(self) -> CancelReason {
        match self {
            Step::Reservation => CancelReason::DeadlineExceeded,
            Step::Payment => CancelReason::PaymentTimeout,
        }
    }

    fn timeout(self, steps: &Steps) -> Duration {
        match self {
            Step::Reservation => steps.reservation,
            Step::Payment => steps.payment,
        }
    }

    /// How the job runner runs this step's timeouts: a failure (the database away) is tried
    /// again from 1 s to 1 min for about an hour; an order whose timeout job was given up on
    /// stays in its step and shows in `orders_in_flight_oldest_age_seconds` and
    /// `jobs_given_up_total`.
    pub fn job_kind(self) -> JobKind {
        JobKind {
            kind: self.kind(),
            max_attempts: 60,
            lease: Duration::from_secs(30),
            backoff: service_kit::backoff::Backoff {
                first: Duration::from_secs(1),
                max: Duration::from_secs(60),
            },
        }
    }
}

/// Starts the reservation step's timeout of a new order (in the transaction that places it).
pub async fn start(conn: &mut PgConnection, order_id: Uuid, steps: &Steps) -> sqlx::Result<()> {
    enqueue(conn, order_id, Step::Reservation, steps).await
}

async fn enqueue(
    conn: &mut PgConnection,
    order_id: Uuid,
    step: Step,
    steps: &Steps,
) -> sqlx::Result<()> {
    jobs::enqueue(
        conn,
        step.kind(),
        &order_id.to_string(),
        &serde_json::Value::Null,
        step.timeout(steps),
    )
    .await?;
    Ok(())
}

/// Ends the timeout of the step the order left and starts the one of the step it entered (in
/// the transaction of that change).
pub async fn follow(
    conn: &mut PgConnection,
    order_id: Uuid,
    from: OrderStatus,
    to: OrderStatus,
    steps: &Steps,
) -> sqlx::Result<()> {
    if from == to {
        return Ok(());
    }
    if let Some(left) = Step::of(from) {
        jobs::cancel(conn, left.kind(), &order_id.to_string()).await?;
    }
    if let Some(entered) = Step::of(to) {
        enqueue(conn, order_id, entered, steps).await?;
    }
    Ok(())
}

/// Cancels an order whose step ran out of time.
#[derive(Debug, Clone, Copy)]
pub struct Timeout {
    pub step: Step,
    pub steps: Steps,
}

impl JobHandler for Timeout {
    async fn run(&self, pool: &PgPool, job: &Job) -> Result<Completed, JobError> {
        let order_id = Uuid::parse_str(&job.key)
            .map_err(|e| JobError::Permanent(format!("the job's key is not an order id: {e}")))?;
        let step = self.step;
        let mut tx = pool.begin().await?;
        let order = store::lock_order(&mut tx, order_id).await?;
        let in_step = order.filter(|(order, _)| order.status == step.status());
        if let Some((_, placed_at)) = in_step {
            // The reservation began when the order was placed; the payment step when its job
            // was queued, in the transaction that entered it.
            let began = match step {
                Step::Reservation => placed_at,
                Step::Payment => job.created_at,
            };
            if let Some(wait) = time_left(began, step.timeout(&self.steps)) {
                return Err(JobError::Later {
                    after: wait,
                    why: "the step's timeout is longer than when the step began".into(),
                });
            }
        }
        // Completed first: leaving the step takes its timeout job (this one) off the queue.
        let done = job.complete(&mut tx).await?;
        let cancelled = match in_step {
            Some((order, _)) => cancel(&mut tx, order_id, &order, step, &self.steps).await?,
            None => None,
        };
        tx.commit().await?;
        if let Some(saga) = cancelled {
            saga.record();
            tracing::info!(%order_id, ?step, timeout = ?step.timeout(&self.steps), "order still in its step after the step's timeout; cancelled it");
        }
        Ok(done)
    }
}

/// How long until a step that began at `began` runs out of `timeout`; `None` once it has.
fn time_left(began: DateTime<Utc>, timeout: Duration) -> Option<Duration> {
    let due = TimeDelta::from_std(timeout)
        .ok()
        .and_then(|timeout| began.checked_add_signed(timeout));
    match due {
        // A timeout past the end of time: look again in an hour.
        None => Some(Duration::from_secs(3600)),
        Some(due) => (due - Utc::now()).to_std().ok().filter(|w| !w.is_zero()),
    }
}

/// Cancels the order as the state machine says for the step's reason; what to record once the
/// transaction commits.
async fn cancel(
    tx: &mut PgConnection,
    order_id: Uuid,
    order: &crate::domain::Order,
    step: Step,
    steps: &Steps,
) -> sqlx::Result<Option<transition::SagaMetrics>> {
    // Each timeout's cancellation starts a trace of its own; the order's events follow it.
    let span = tracing::info_span!("step timeout", otel.name = "cancel overdue order",
        order_id = %order_id, trace_id = tracing::field::Empty);
    service_kit::trace_context::continue_from(&span, None);
    let cause = Cause {
        traceparent: Some(service_kit::trace_context::of(&span)),
        ..Cause::default()
    };
    let input = Input::CancelRequested {
        reason: step.reason(),
    };
    Ok(
        match transition::apply(tx, order_id, order, &input, &cause, steps).await? {
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
/// the oldest one's last change) for every status whose saga is not over. No timeout covers a
/// REFUNDING or CANCELLING order (a compensation waiting for payment-service or inventory, or
/// whose event was dead-lettered): these gauges (and the OrdersStuckInFlight alert on them) are
/// how such an order becomes visible.
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
        "Orders whose saga is not over, by status (PENDING, AWAITING_PAYMENT, REFUNDING, CANCELLING); counted every 5 s"
    );
    describe_gauge!(
        "orders_in_flight_oldest_age_seconds",
        Unit::Seconds,
        "Time since the last change of the oldest order in each in-flight status"
    );
}
