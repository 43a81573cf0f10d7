//! The calls to the processor, run as jobs on the kit's job runner ([`service_kit::jobs`]), never
//! inside a consumer's transaction: a `charge-payment` job per payment, queued with the payment,
//! and a `refund-payment` job, queued when the order asks for its money back. Both key on the
//! payment id and do what [`domain::next_step`] says, each step's effect and its event written in
//! one transaction under the payment's lock.
//!
//! - **Charge**: the payment's row is marked as "a request may be in flight" (for the request
//!   timeout and a margin) before the request is sent, with the payment id as Idempotency-Key.
//!   The answer, checked against the request, becomes CONFIRMED + PaymentConfirmed or DECLINED +
//!   PaymentDeclined. No answer (a timeout, a cut connection, a 5xx) is a failed attempt: it is
//!   sent again, with the same key, so the processor answers what it did the first time. An open
//!   breaker is not a failure: the job waits the breaker's retry-after and spends no attempt.
//! - **Refund**: a CONFIRMED payment is refunded in full (Idempotency-Key `refund-{payment id}`);
//!   a payment never sent is VOIDED; one whose charge may have been sent waits until no request
//!   can still be in flight and asks the processor's ledger: what it charged is recorded
//!   (PaymentConfirmed) and then refunded, what it did not is VOIDED. Every way ends in
//!   PaymentRefunded, whose `refunded_cents` is what came back (0 when nothing was charged).
//!   Compensations retry until done: the refund job's budget is days, and the payments waiting on
//!   it show in `payments_in_flight{state="refunding"}`.
//!
//! Once a refund is asked for, no charge request is sent for the payment again (the charge job
//! looks under the row's lock before each request, and [`domain::next_step`] never says Charge
//! then). A request can still reach the processor, or be recorded there, later than its in-flight
//! window (a process frozen between marking the row and sending; a processor slow to commit):
//! a **late charge** of a payment already voided. A `refund-late-charge` job refunds it in full:
//! queued at once when the late charge's own answer comes back, and queued for
//! `--late-charge-recheck` after every void of a payment whose charge was sent, to ask the
//! processor's ledger once more. Each one found is logged and counted in
//! `payments_late_charges_total` (an in-flight window too short for the processor).

use std::sync::Arc;
use std::time::Duration;

use messaging::outbox::{self, Cause};
use schemas::{Event, PaymentConfirmed, PaymentDeclined, PaymentRefunded};
use serde::{Deserialize, Serialize};
use service_kit::jobs::{Completed, Job, JobError, JobHandler, JobKind, Wake};
use sqlx::{PgConnection, PgPool};
use tracing::Instrument;
use uuid::Uuid;

use crate::domain::PaymentStatus;
use crate::domain::{LedgerFinding, Step, next_step};
use crate::gateway::{Charged, Gateway, GatewayError};
use crate::store::{self, Record, Settled};

/// The job that charges a payment; its key is the payment id.
pub const CHARGE: &str = "charge-payment";
/// The job that refunds or voids a payment; its key is the payment id.
pub const REFUND: &str = "refund-payment";
/// The job that looks for, and refunds, a charge the processor made after the payment was
/// voided; its key is the payment id.
pub const LATE: &str = "refund-late-charge";

/// The longest a refund job waits before it looks again at a payment whose charge request may
/// still be in flight: the charge's answer, when it comes, lets it go on at once after that.
const IN_FLIGHT_LOOK: Duration = Duration::from_secs(1);

/// A charge that gets no usable answer is sent again from 1 s to 30 s apart, 20 times (about 8
/// minutes), long after the order's payment step has timed out and asked for the refund; then it
/// is given up on (`jobs_given_up_total{kind="charge-payment"}`) and the payment waits for that
/// refund request.
pub fn charge_kind() -> JobKind {
    JobKind {
        kind: CHARGE,
        max_attempts: 20,
        lease: Duration::from_secs(30),
        backoff: service_kit::backoff::Backoff {
            first: Duration::from_secs(1),
            max: Duration::from_secs(30),
        },
    }
}

/// A refund is a compensation: it is tried until it is done (every minute for about a week),
/// not dead-lettered.
pub fn refund_kind() -> JobKind {
    JobKind {
        kind: REFUND,
        max_attempts: 10_000,
        lease: Duration::from_secs(30),
        backoff: service_kit::backoff::Backoff {
            first: Duration::from_secs(1),
            max: Duration::from_secs(60),
        },
    }
}

/// A late charge is money kept for a cancelled order: like a refund, tried until it is done.
pub fn late_kind() -> JobKind {
    JobKind {
        kind: LATE,
        ..refund_kind()
    }
}

/// Where a job's work came from: the message that queued it and its trace, so that the events
/// the job writes are caused by that message and belong to the order's trace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub causation_id: Option<Uuid>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl Origin {
    pub fn of(cause: &Cause) -> Origin {
        Origin {
            causation_id: cause.causation_id,
            traceparent: cause.traceparent.clone(),
            tracestate: cause.tracestate.clone(),
        }
    }

    fn payload(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// Queues a job of `kind` for the payment in the caller's transaction, due at once.
pub async fn enqueue(
    conn: &mut PgConnection,
    kind: &str,
    payment_id: Uuid,
    origin: &Origin,
) -> sqlx::Result<()> {
    enqueue_after(conn, kind, payment_id, origin, Duration::ZERO).await
}

/// Queues a job of `kind` for the payment, due after `delay`; one already queued becomes due
/// by then if it was due later.
async fn enqueue_after(
    conn: &mut PgConnection,
    kind: &str,
    payment_id: Uuid,
    origin: &Origin,
    delay: Duration,
) -> sqlx::Result<()> {
    let key = payment_id.to_string();
    if !service_kit::jobs::enqueue(conn, kind, &key, &origin.payload(), delay).await? {
        service_kit::jobs::due_within(conn, kind, &key, delay).await?;
    }
    Ok(())
}

/// What both jobs share: the processor and how long a charge request may be in flight.
pub struct Payments {
    pub gateway: Gateway,
    /// The request timeout and a margin: after this, no charge request sent can still reach the
    /// processor.
    pub in_flight_window: Duration,
    /// Wakes the job runner (a refund that a charge's answer lets go on).
    pub wake: Wake,
    /// How long after a payment whose charge was sent is voided the processor's ledger is asked
    /// once more for a late charge.
    pub late_recheck: Duration,
}

/// Which job is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Charge,
    Refund,
}

pub struct ChargeJob(pub Arc<Payments>);
pub struct RefundJob(pub Arc<Payments>);
pub struct LateChargeJob(pub Arc<Payments>);

impl JobHandler for ChargeJob {
    async fn run(&self, pool: &PgPool, job: &Job) -> Result<Completed, JobError> {
        self.0.work(pool, job, Role::Charge).await
    }
}

impl JobHandler for RefundJob {
    async fn run(&self, pool: &PgPool, job: &Job) -> Result<Completed, JobError> {
        self.0.work(pool, job, Role::Refund).await
    }
}

impl JobHandler for LateChargeJob {
    async fn run(&self, pool: &PgPool, job: &Job) -> Result<Completed, JobError> {
        let work = Work::of(pool, job)?;
        let span = work.span.clone();
        self.0.late_charge(&work).instrument(span).await
    }
}

/// The job, its payment and its origin, as one step sees them.
struct Work<'a> {
    pool: &'a PgPool,
    job: &'a Job,
    payment_id: Uuid,
    origin: Origin,
    span: tracing::Span,
}

impl<'a> Work<'a> {
    /// The job's payment (its key), its origin (its payload) and its span, a child of the
    /// origin's trace.
    fn of(pool: &'a PgPool, job: &'a Job) -> Result<Work<'a>, JobError> {
        let payment_id = Uuid::parse_str(&job.key)
            .map_err(|e| permanent(format!("the job's key is not a payment id: {e}")))?;
        // A payload that does not read (an older version's) only loses the trace link.
        let origin: Origin = serde_json::from_value(job.payload.clone()).unwrap_or_default();
        let span = tracing::info_span!("payment job", otel.name = %format!("{} {payment_id}", job.kind),
            payment_id = %payment_id, attempt = job.attempt, trace_id = tracing::field::Empty);
        service_kit::trace_context::continue_from(&span, origin.traceparent.as_deref());
        Ok(Work {
            pool,
            job,
            payment_id,
            origin,
            span,
        })
    }

    /// The cause of an event this job writes.
    fn cause(&self) -> Cause {
        Cause {
            causation_id: self.origin.causation_id,
            traceparent: Some(service_kit::trace_context::of(&self.span)),
            tracestate: self.origin.tracestate.clone(),
        }
    }

    /// Completes the job in a transaction of its own (nothing left to do).
    async fn nothing_to_do(&self) -> Result<Completed, JobError> {
        let mut tx = self.pool.begin().await?;
        let done = self.job.complete(&mut tx).await?;
        tx.commit().await?;
        Ok(done)
    }

    /// Locks the payment; `None` (and the transaction rolled back) when its next step is no
    /// longer `expected` (another job or message moved it meanwhile: look again).
    async fn lock_if_still(
        &self,
        expected: &Step,
    ) -> Result<Option<(sqlx::Transaction<'static, sqlx::Postgres>, Record)>, JobError> {
        let mut tx = self.pool.begin().await?;
        let record = load(
            store::lock(&mut tx, self.payment_id).await?,
            self.payment_id,
        )?;
        let step = next_step(&record.payment().map_err(permanent)?);
        if std::mem::discriminant(&step) == std::mem::discriminant(expected) {
            Ok(Some((tx, record)))
        } else {
            tx.rollback().await?;
            Ok(None)
        }
    }
}

fn permanent(e: impl std::fmt::Display) -> JobError {
    JobError::Permanent(e.to_string())
}

fn load(record: Option<Record>, payment_id: Uuid) -> Result<Record, JobError> {
    record.ok_or_else(|| JobError::Permanent(format!("no payment {payment_id}")))
}

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Where a step left the job.
enum Flow {
    /// The job is complete (its effect committed with the completion).
    Done(Completed),
    /// The payment moved on (this step's effect, or another's meanwhile): look again.
    Again,
}

impl Payments {
    async fn work(&self, pool: &PgPool, job: &Job, role: Role) -> Result<Completed, JobError> {
        let work = Work::of(pool, job)?;
        let span = work.span.clone();
        self.steps(&work, role).instrument(span).await
    }

    /// Takes the payment's steps until the job is done, fails, or must wait.
    async fn steps(&self, work: &Work<'_>, role: Role) -> Result<Completed, JobError> {
        // At most three steps follow one another (found in the ledger, then refunded); the
        // bound guards against a payment that keeps changing under the job.
        for _ in 0..4 {
            let record = load(
                store::get(work.pool, work.payment_id).await?,
                work.payment_id,
            )?;
            let step = next_step(&record.payment().map_err(permanent)?);
            let flow = match (role, &step) {
                (_, Step::Done) => Flow::Done(work.nothing_to_do().await?),
                (Role::Charge, Step::Charge) => self.charge(work, &record).await?,
                // The refund was asked for: what is left is the refund job's.
                (Role::Charge, _) => Flow::Done(work.nothing_to_do().await?),
                (Role::Refund, Step::Charge) => {
                    return Err(permanent(format!(
                        "payment {} has a refund job but no refund was asked for",
                        work.payment_id
                    )));
                }
                (Role::Refund, Step::Wait(left)) => {
                    return Err(JobError::Later {
                        after: (*left).min(IN_FLIGHT_LOOK),
                        why: "a charge request may still be in flight".into(),
                    });
                }
                (Role::Refund, Step::AskLedger) => self.ask_ledger(work, &record).await?,
                (
                    Role::Refund,
                    Step::Refund {
                        charge_id,
                        amount_cents,
                    },
                ) => {
                    self.refund(work, &record, *charge_id, *amount_cents)
                        .await?
                }
                (Role::Refund, Step::Void) => {
                    self.void(
                        work,
                        &record,
                        &Step::Void,
                        "voided before any charge was sent",
                    )
                    .await?
                }
                (Role::Refund, Step::AnswerNothingCharged) => {
                    self.answer_declined(work, &record).await?
                }
            };
            if let Flow::Done(done) = flow {
                return Ok(done);
            }
        }
        Err(JobError::Failed(anyhow::anyhow!(
            "payment {} kept changing while its job ran",
            work.payment_id
        )))
    }

    /// Sends the charge and records its answer.
    async fn charge(&self, work: &Work<'_>, record: &Record) -> Result<Flow, JobError> {
        let customer_id = record.customer_id.ok_or_else(|| {
            permanent(format!(
                "payment {} has no customer to charge",
                work.payment_id
            ))
        })?;
        // The breaker first: a call it rejects sends nothing, so nothing is marked.
        let permit = self.gateway.permit().map_err(GatewayError::from)?;
        let Some((mut tx, _)) = work.lock_if_still(&Step::Charge).await? else {
            return Ok(Flow::Again);
        };
        store::mark_charge_sent(&mut tx, work.payment_id, self.in_flight_window).await?;
        tx.commit().await?;
        let answer = self
            .gateway
            .charge(permit, work.payment_id, customer_id, record.amount_cents)
            .await?;
        let mut tx = work.pool.begin().await?;
        let now = load(
            store::lock(&mut tx, work.payment_id).await?,
            work.payment_id,
        )?;
        let done = work.job.complete(&mut tx).await?;
        if now.status != PaymentStatus::Requested.as_str() {
            // Settled meanwhile without this answer: only a request that reached the processor
            // after its in-flight window can get here (see the module's documentation).
            let late = match &answer {
                Charged::Succeeded { charge_id } if now.charge_id != Some(*charge_id) => {
                    Some(*charge_id)
                }
                _ => None,
            };
            if let Some(charge_id) = late {
                store::mark_late_charge(&mut tx, work.payment_id, charge_id).await?;
                enqueue(&mut tx, LATE, work.payment_id, &work.origin).await?;
            }
            tx.commit().await?;
            if let Some(charge_id) = late {
                tracing::warn!(payment_id = %work.payment_id, %charge_id, status = %now.status,
                    "a charge succeeded after its payment was settled without it; refunding it");
                self.wake.now();
            }
            return Ok(Flow::Done(done));
        }
        let (event, outcome) = match answer {
            Charged::Succeeded { charge_id } => {
                store::settle(&mut tx, work.payment_id, &Settled::Confirmed { charge_id }).await?;
                (confirmed(record), "confirmed")
            }
            Charged::Declined { decline_code } => {
                let reason = format!("declined by the processor ({decline_code})");
                let settled = Settled::Declined {
                    decline_code: &decline_code,
                    reason: &reason,
                };
                store::settle(&mut tx, work.payment_id, &settled).await?;
                let event = Event::PaymentDeclined(PaymentDeclined {
                    order_id: record.order_id,
                    payment_id: work.payment_id,
                    reason,
                    decline_code,
                    declined_at: now_millis(),
                });
                (event, "declined")
            }
        };
        outbox::append(&mut tx, &event, &work.cause()).await?;
        tx.commit().await?;
        counted(outcome, record);
        if now.refund_requested_at.is_some() {
            // The refund job waits for this answer.
            self.wake.now();
        }
        Ok(Flow::Done(done))
    }

    /// Asks the ledger what came of a charge whose answer never came: a charge it shows is
    /// recorded (the refund follows), a payment it shows no charge of is voided.
    async fn ask_ledger(&self, work: &Work<'_>, record: &Record) -> Result<Flow, JobError> {
        let permit = self.gateway.permit().map_err(GatewayError::from)?;
        let finding = self
            .gateway
            .find_charge(permit, work.payment_id, record.amount_cents)
            .await?;
        let LedgerFinding::Charged { charge_id } = finding else {
            return self
                .void(
                    work,
                    record,
                    &Step::AskLedger,
                    "voided: the processor charged nothing",
                )
                .await;
        };
        let Some((mut tx, _)) = work.lock_if_still(&Step::AskLedger).await? else {
            return Ok(Flow::Again);
        };
        store::settle(&mut tx, work.payment_id, &Settled::Confirmed { charge_id }).await?;
        outbox::append(&mut tx, &confirmed(record), &work.cause()).await?;
        tx.commit().await?;
        counted("confirmed", record);
        tracing::info!(payment_id = %work.payment_id, %charge_id,
            "the processor's ledger shows the charge whose answer never came; refunding it");
        Ok(Flow::Again)
    }

    /// Refunds the charge in full: REFUNDED, PaymentRefunded with the amount.
    async fn refund(
        &self,
        work: &Work<'_>,
        record: &Record,
        charge_id: Uuid,
        amount_cents: i64,
    ) -> Result<Flow, JobError> {
        let permit = self.gateway.permit().map_err(GatewayError::from)?;
        let refund_id = self
            .gateway
            .refund(permit, work.payment_id, charge_id, amount_cents)
            .await?;
        let step = Step::Refund {
            charge_id,
            amount_cents,
        };
        let Some((mut tx, _)) = work.lock_if_still(&step).await? else {
            return Ok(Flow::Again);
        };
        let done = work.job.complete(&mut tx).await?;
        let settled = Settled::Refunded {
            refunded_cents: amount_cents,
        };
        store::settle(&mut tx, work.payment_id, &settled).await?;
        outbox::append(
            &mut tx,
            &refunded(record.order_id, record.payment_id, amount_cents),
            &work.cause(),
        )
        .await?;
        tx.commit().await?;
        counted("refunded", record);
        tracing::info!(payment_id = %work.payment_id, %charge_id, %refund_id, amount_cents, "payment refunded");
        Ok(Flow::Done(done))
    }

    /// Voids a payment nothing was charged for: VOIDED, PaymentRefunded with 0.
    async fn void(
        &self,
        work: &Work<'_>,
        record: &Record,
        expected: &Step,
        reason: &str,
    ) -> Result<Flow, JobError> {
        self.nothing_charged(work, record, expected, Some(reason))
            .await
    }

    /// A payment declined after its refund was asked for: PaymentRefunded with 0 (the status
    /// stays DECLINED).
    async fn answer_declined(&self, work: &Work<'_>, record: &Record) -> Result<Flow, JobError> {
        self.nothing_charged(work, record, &Step::AnswerNothingCharged, None)
            .await
    }

    /// Answers the refund request with PaymentRefunded of 0, the payment VOIDED for `voided`
    /// (or left as it is), if its next step is still `expected`.
    async fn nothing_charged(
        &self,
        work: &Work<'_>,
        record: &Record,
        expected: &Step,
        voided: Option<&str>,
    ) -> Result<Flow, JobError> {
        let Some((mut tx, _)) = work.lock_if_still(expected).await? else {
            return Ok(Flow::Again);
        };
        let done = work.job.complete(&mut tx).await?;
        if let Some(reason) = voided {
            store::settle(&mut tx, work.payment_id, &Settled::Voided { reason }).await?;
        }
        if *expected == Step::AskLedger {
            // Its charge was sent: ask the ledger once more later, for one recorded late.
            enqueue_after(
                &mut tx,
                LATE,
                work.payment_id,
                &work.origin,
                self.late_recheck,
            )
            .await?;
        }
        let event = refunded(record.order_id, record.payment_id, 0);
        outbox::append(&mut tx, &event, &work.cause()).await?;
        tx.commit().await?;
        if voided.is_some() {
            counted("voided", record);
        }
        Ok(Flow::Done(done))
    }
}

impl Payments {
    /// Refunds a charge the processor made after the payment was voided: the one its late
    /// answer named, or one the ledger shows now. A payment with none is done.
    async fn late_charge(&self, work: &Work<'_>) -> Result<Completed, JobError> {
        for _ in 0..4 {
            let record = load(
                store::get(work.pool, work.payment_id).await?,
                work.payment_id,
            )?;
            if record.status != PaymentStatus::Voided.as_str() || record.late_refunded_cents > 0 {
                // Only a voided payment can be charged late (any other keeps or refunds its
                // one charge by the normal way), and this one's is refunded.
                return work.nothing_to_do().await;
            }
            let charge_id = match record.late_charge_id {
                Some(charge_id) => Some(charge_id),
                None => {
                    let permit = self.gateway.permit().map_err(GatewayError::from)?;
                    match self
                        .gateway
                        .find_charge(permit, work.payment_id, record.amount_cents)
                        .await?
                    {
                        LedgerFinding::Charged { charge_id } => Some(charge_id),
                        LedgerFinding::NothingCharged => None,
                    }
                }
            };
            let refund_id = match charge_id {
                Some(charge_id) => {
                    let permit = self.gateway.permit().map_err(GatewayError::from)?;
                    let refund = self
                        .gateway
                        .refund(permit, work.payment_id, charge_id, record.amount_cents)
                        .await?;
                    Some((charge_id, refund))
                }
                None => None,
            };
            let mut tx = work.pool.begin().await?;
            let now = load(
                store::lock(&mut tx, work.payment_id).await?,
                work.payment_id,
            )?;
            if refund_id.is_none() && now.late_charge_id.is_some() {
                // A late answer named a charge meanwhile: refund that one.
                tx.rollback().await?;
                continue;
            }
            let done = work.job.complete(&mut tx).await?;
            if let Some((charge_id, _)) = refund_id {
                store::settle_late_charge(&mut tx, work.payment_id, charge_id, record.amount_cents)
                    .await?;
            }
            tx.commit().await?;
            if let Some((charge_id, refund_id)) = refund_id {
                metrics::counter!("payments_late_charges_total").increment(1);
                tracing::warn!(payment_id = %work.payment_id, order_id = %record.order_id, %charge_id, %refund_id,
                    amount_cents = record.amount_cents,
                    "the processor charged a voided payment after its in-flight window; refunded the late charge in full");
            }
            return Ok(done);
        }
        Err(JobError::Failed(anyhow::anyhow!(
            "payment {} kept changing while its late charge was looked for",
            work.payment_id
        )))
    }
}

fn confirmed(record: &Record) -> Event {
    Event::PaymentConfirmed(PaymentConfirmed {
        order_id: record.order_id,
        payment_id: record.payment_id,
        amount_cents: record.amount_cents,
        confirmed_at: now_millis(),
    })
}

/// PaymentRefunded of `refunded_cents` (0: nothing was charged).
pub fn refunded(order_id: Uuid, payment_id: Uuid, refunded_cents: i64) -> Event {
    Event::PaymentRefunded(PaymentRefunded {
        order_id,
        payment_id,
        refunded_cents,
        refunded_at: now_millis(),
    })
}

/// Counts what a payment came to, once its transaction committed.
fn counted(outcome: &'static str, record: &Record) {
    metrics::counter!("payments_total", "outcome" => outcome).increment(1);
    tracing::info!(payment_id = %record.payment_id, order_id = %record.order_id,
        amount_cents = record.amount_cents, outcome, "payment settled");
}
