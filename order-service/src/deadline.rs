//! The saga deadline: an order still PENDING after the deadline is cancelled with reason
//! DEADLINE_EXCEEDED, exactly as a customer cancel would (OrderCancelled, then inventory releases
//! whatever it reserved). The deadline is data, not a timer: a periodic query finds overdue
//! orders by `created_at`, so it survives restarts. Overdue rows are taken `FOR UPDATE SKIP
//! LOCKED` and re-decided by the state machine, so several order-service instances never cancel
//! one order twice.

use std::time::Duration;

use messaging::outbox::Cause;
use messaging::shutdown::Shutdown;
use schemas::CancelReason;
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::{Input, OrderStatus};
use crate::transition::{self, Applied};

/// Most orders cancelled per check (one transaction).
const BATCH: i64 = 100;

/// How often the orders still in flight are counted ([`measure_in_flight`]).
const MEASURE_EVERY: Duration = Duration::from_secs(5);

/// Checks for overdue orders every `deadline / 10` (between 100 ms and 1 s) until shutdown, and
/// measures the orders in flight every [`MEASURE_EVERY`].
pub async fn run(pool: PgPool, deadline: Duration, shutdown: Shutdown) {
    let every = (deadline / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
    tracing::info!(?deadline, ?every, "saga deadline check started");
    let mut measured_at: Option<std::time::Instant> = None;
    while shutdown.sleep(every).await.is_ok() {
        if measured_at.is_none_or(|t| t.elapsed() >= MEASURE_EVERY) {
            if let Err(e) = measure_in_flight(&pool).await {
                tracing::warn!(error = %e, "could not count the orders in flight; trying again later");
            }
            measured_at = Some(std::time::Instant::now());
        }
        loop {
            match cancel_overdue(&pool, deadline).await {
                Ok(n) if n as i64 == BATCH => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "saga deadline check failed; trying again later");
                    break;
                }
            }
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

/// Cancels (DEADLINE_EXCEEDED) up to [`BATCH`] orders PENDING for longer than `deadline`;
/// returns how many.
pub async fn cancel_overdue(pool: &PgPool, deadline: Duration) -> sqlx::Result<usize> {
    let mut tx = pool.begin().await?;
    let overdue: Vec<Uuid> = sqlx::query_scalar(
        "SELECT order_id FROM orders WHERE status = $1 AND created_at < now() - make_interval(secs => $2) \
         ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED",
    )
    .bind(OrderStatus::Pending.as_str())
    .bind(deadline.as_secs_f64())
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    let input = Input::CancelRequested {
        reason: CancelReason::DeadlineExceeded,
    };
    let mut cancelled = Vec::new();
    for order_id in &overdue {
        // Each deadline cancellation starts a trace of its own; the order's events follow it.
        let span = tracing::info_span!("saga deadline", otel.name = "cancel overdue order",
            order_id = %order_id, trace_id = tracing::field::Empty);
        messaging::trace_context::continue_from(&span, None);
        let cause = Cause {
            traceparent: Some(messaging::trace_context::of(&span)),
            ..Cause::default()
        };
        if let Ok(Applied::Changed { saga, .. }) =
            transition::apply(&mut tx, *order_id, OrderStatus::Pending, &input, &cause).await?
        {
            cancelled.push((order_id, saga));
        }
    }
    tx.commit().await?;
    let n = cancelled.len();
    for (order_id, saga) in cancelled {
        saga.record();
        tracing::info!(%order_id, ?deadline, "order still PENDING after the saga deadline; cancelled it");
    }
    Ok(n)
}
