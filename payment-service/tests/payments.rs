//! payment-service's handler and jobs against a real Postgres and the stand-in processor over
//! real HTTP: order events are applied as the consumer runtime applies them (the handler in a
//! transaction, its after-commit actions after the commit), the job runner runs for real, and
//! each test checks what a user would: the payment's status, the events in the outbox, and the
//! processor's ledger (every cent charged and refunded).
//!
//! The Kafka side (inbox dedupe, retries, dead letters) is the consumer runtime's and is tested
//! there and end to end; here a redelivered event is a copy with a new message id, the case the
//! inbox cannot catch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use messaging::Envelope;
use messaging::consumer::Handler;
use payment_gateway::faults::{Faults, Knobs, Mode};
use payment_gateway::ledger::{ChargeStatus, DeclineRules, LedgerEntry};
use payment_service::charging::{self, ChargeJob, LateChargeJob, Payments, RefundJob};
use payment_service::consumer::OrderEvents;
use payment_service::gateway::Gateway;
use payment_service::store::{self, Record};
use schemas::{CancelReason, Event, OrderAwaitingPayment, OrderRefundRequested};
use service_kit::breaker::{self, Breaker, State};
use service_kit::http::AdminToken;
use service_kit::jobs::Runner;
use service_kit::outbound::{Client, Timeouts};
use service_kit::shutdown::{Shutdown, Trigger};
use sqlx::PgPool;
use uuid::Uuid;

/// Charges above this are declined (`over_limit`).
const LIMIT_CENTS: i64 = 100_000;
/// The client's request timeout: short, so that a hang is found out quickly.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(800);
const PAYMENT_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The payment service's tables, the stand-in processor on a port of its own, and the job
/// runner, for one test.
struct Harness {
    payments: PgPool,
    ledger: PgPool,
    knobs: Knobs,
    breaker: Breaker,
    handler: OrderEvents,
    charges_gate: tokio::sync::watch::Sender<bool>,
    _stop: Trigger,
}

/// How a test's harness differs from the plain one.
#[derive(Default)]
struct Setup {
    /// Another server to call instead of the stand-in (for hostile answers).
    gateway: Option<axum::Router>,
    /// Charge requests reach the stand-in only once the test lets them through
    /// ([`Harness::release_charges`]), whether or not the client is still waiting then (a
    /// processor slow to record them).
    charges_held: bool,
    /// The client's request timeout, when not [`REQUEST_TIMEOUT`].
    request_timeout: Option<Duration>,
    /// How long a charge request is taken to be in flight, when not the request timeout and a
    /// margin (shorter: a request that outlives its window).
    in_flight_window: Option<Duration>,
    /// How long after a void the ledger is asked again for a late charge
    /// (`--late-charge-recheck`), when not [`LATE_RECHECK`].
    late_recheck: Option<Duration>,
}

const LATE_RECHECK: Duration = Duration::from_secs(2);

impl Harness {
    async fn start(name: &str) -> Harness {
        Harness::with(name, Setup::default()).await
    }

    async fn with(name: &str, setup: Setup) -> Harness {
        let payments = service_kit::testing::database(
            &format!("payments_{name}"),
            &[&messaging::MIGRATIONS, &PAYMENT_MIGRATIONS],
        )
        .await;
        let ledger = service_kit::testing::database(
            &format!("ledger_{name}"),
            &[&payment_gateway::MIGRATIONS],
        )
        .await;
        let knobs = Knobs::default();
        let mut app = setup.gateway.unwrap_or_else(|| {
            payment_gateway::http::routes(payment_gateway::http::AppState {
                pool: ledger.clone(),
                rules: Arc::new(DeclineRules {
                    above_cents: LIMIT_CENTS,
                    customers: Vec::new(),
                }),
                knobs: knobs.clone(),
                admin_token: AdminToken::default(),
            })
        });
        let (gate, _) = tokio::sync::watch::channel(!setup.charges_held);
        if setup.charges_held {
            app = app.layer(axum::middleware::from_fn_with_state(
                gate.subscribe(),
                hold_charges,
            ));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway_url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let breaker = Breaker::new(
            "payment-gateway",
            breaker::Settings {
                minimum_calls: 3,
                first_break: Duration::from_millis(500),
                max_break: Duration::from_secs(2),
                ..breaker::Settings::default()
            },
        )
        .unwrap();
        let client = Client::new(
            "payment-gateway",
            &gateway_url,
            Timeouts {
                connect: Duration::from_millis(500),
                request: setup.request_timeout.unwrap_or(REQUEST_TIMEOUT),
            },
        )
        .unwrap();
        let runner = Runner::default().polling_every(Duration::from_millis(50));
        let wake = runner.wake();
        let shared = Arc::new(Payments {
            gateway: Gateway::new(client, breaker.clone()),
            in_flight_window: setup
                .in_flight_window
                .unwrap_or(REQUEST_TIMEOUT + Duration::from_millis(500)),
            wake: wake.clone(),
            late_recheck: setup.late_recheck.unwrap_or(LATE_RECHECK),
        });
        let runner = runner
            .with(charging::charge_kind(), ChargeJob(shared.clone()))
            .with(charging::refund_kind(), RefundJob(shared.clone()))
            .with(charging::late_kind(), LateChargeJob(shared));
        let (stop, shutdown) = Shutdown::new();
        tokio::spawn(runner.run(payments.clone(), shutdown));
        Harness {
            payments,
            ledger,
            knobs,
            breaker,
            handler: OrderEvents { wake },
            charges_gate: gate,
            _stop: stop,
        }
    }

    /// Lets the held charge requests through to the processor ([`Setup::charges_held`]).
    fn release_charges(&self) {
        self.charges_gate.send_replace(true);
    }

    /// Applies `event` as the consumer runtime does: in a transaction, then what the handler
    /// left for after the commit. The handler's error, if it refused it.
    async fn deliver(&self, event: Event) -> Result<(), messaging::HandlerError> {
        let envelope = Envelope {
            message_id: Uuid::now_v7(),
            correlation_id: Some(event.order_id().to_string()),
            event,
            topic: schemas::ORDERS_TOPIC.to_owned(),
            partition: 0,
            offset: 0,
            traceparent: None,
            tracestate: None,
        };
        let mut tx = self.payments.begin().await.unwrap();
        let after = self.handler.handle(&mut tx, &envelope).await?;
        tx.commit().await.unwrap();
        after.run();
        Ok(())
    }

    async fn payment_of(&self, order_id: Uuid) -> Option<Record> {
        store::list(&self.payments, Some(order_id), 10)
            .await
            .unwrap()
            .into_iter()
            .next()
    }

    /// Waits until the order's payment has `status`, and returns it.
    async fn settled(&self, order_id: Uuid, status: &str) -> Record {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let payment = self.payment_of(order_id).await;
            if let Some(p) = &payment
                && p.status == status
            {
                return payment.unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "order {order_id}'s payment did not become {status} within 60 s: {payment:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The events in the outbox for `order_id`, in the order they were written.
    async fn events_of(&self, order_id: Uuid) -> Vec<Event> {
        let rows: Vec<(Vec<u8>,)> = sqlx::query_as(
            "SELECT payload FROM outbox WHERE aggregate_id = $1 ORDER BY message_id",
        )
        .bind(order_id.to_string())
        .fetch_all(&self.payments)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(payload,)| schemas::decode(&payload).expect("an event the contract knows"))
            .collect()
    }

    async fn ledger_of(&self, payment_id: Uuid) -> Vec<LedgerEntry> {
        payment_gateway::ledger::of_payment(&self.ledger, payment_id)
            .await
            .unwrap()
    }

    /// Cents the processor holds for the payment: charged minus refunded.
    async fn net_cents(&self, payment_id: Uuid) -> i64 {
        self.ledger_of(payment_id)
            .await
            .iter()
            .filter(|e| e.charge.status == ChargeStatus::Succeeded)
            .map(|e| e.charge.amount_cents - e.refunds.iter().map(|r| r.amount_cents).sum::<i64>())
            .sum()
    }

    /// Jobs of the payment still queued (not given up on), and given up on.
    async fn jobs_of(&self, payment_id: Uuid) -> (i64, i64) {
        sqlx::query_as(
            "SELECT count(*) FILTER (WHERE failed_at IS NULL), count(*) FILTER (WHERE failed_at IS NOT NULL) \
             FROM jobs WHERE key = $1",
        )
        .bind(payment_id.to_string())
        .fetch_one(&self.payments)
        .await
        .unwrap()
    }

    /// Asks for `n` payments of `amount_cents` each with the processor in `mode`, and waits
    /// until the breaker has opened; their orders.
    async fn payments_until_the_breaker_opens(
        &self,
        mode: Mode,
        n: usize,
        amount_cents: i64,
    ) -> Vec<Uuid> {
        self.faults(mode, 0);
        let orders: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
        for order_id in &orders {
            self.deliver(awaiting(*order_id, Uuid::now_v7(), amount_cents))
                .await
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.breaker.state() == State::Closed {
            assert!(Instant::now() < deadline, "the breaker did not open");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        orders
    }

    fn faults(&self, mode: Mode, latency_ms: u64) {
        self.knobs.set(Faults {
            mode,
            latency_ms,
            error_rate: 0.0,
        });
    }
}

/// Holds each `POST /charges` until `gate` opens before the processor sees it, in a task of its
/// own, so that it is recorded even when the client has given up meanwhile.
async fn hold_charges(
    axum::extract::State(mut gate): axum::extract::State<tokio::sync::watch::Receiver<bool>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if request.method() != axum::http::Method::POST || request.uri().path() != "/charges" {
        return next.run(request).await;
    }
    // The body is read first: once the client gives up, its connection cannot be read.
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024)
        .await
        .expect("a charge's body");
    let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(body));
    tokio::spawn(async move {
        gate.wait_for(|open| *open)
            .await
            .expect("the harness's gate");
        next.run(request).await
    })
    .await
    .expect("the held charge's task")
}

fn awaiting(order_id: Uuid, customer_id: Uuid, amount_cents: i64) -> Event {
    Event::OrderAwaitingPayment(OrderAwaitingPayment {
        order_id,
        customer_id,
        amount_cents,
        pay_by: chrono::Utc::now().timestamp_millis() + 30_000,
        at: chrono::Utc::now().timestamp_millis(),
    })
}

fn refund_requested(order_id: Uuid, amount_cents: i64) -> Event {
    Event::OrderRefundRequested(OrderRefundRequested {
        order_id,
        amount_cents,
        reason: CancelReason::PaymentTimeout,
        requested_at: chrono::Utc::now().timestamp_millis(),
    })
}

fn event_types(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.event_type()).collect()
}

#[tokio::test]
async fn a_payment_is_charged_once_however_often_it_is_asked_for() {
    let h = Harness::start("charged_once").await;
    let (order_id, customer_id) = (Uuid::now_v7(), Uuid::now_v7());
    h.deliver(awaiting(order_id, customer_id, 500))
        .await
        .unwrap();
    let payment = h.settled(order_id, "CONFIRMED").await;
    // A copy of the request (another message id) while and after the charge is made.
    h.deliver(awaiting(order_id, customer_id, 500))
        .await
        .unwrap();
    assert_eq!(payment.amount_cents, 500);
    assert_eq!(payment.customer_id, Some(customer_id));
    assert_eq!(payment.attempts, 1);
    let ledger = h.ledger_of(payment.payment_id).await;
    assert_eq!(ledger.len(), 1, "one charge: {ledger:?}");
    assert_eq!(Some(ledger[0].charge.charge_id), payment.charge_id);
    assert_eq!(h.net_cents(payment.payment_id).await, 500);
    let events = h.events_of(order_id).await;
    match events.as_slice() {
        [Event::PaymentConfirmed(e)] => {
            assert_eq!((e.payment_id, e.amount_cents), (payment.payment_id, 500));
        }
        other => panic!(
            "expected one PaymentConfirmed, got {:?}",
            event_types(other)
        ),
    }
    assert_eq!(h.jobs_of(payment.payment_id).await, (0, 0));
    // The same request with another amount contradicts the payment: dead-lettered.
    let err = h
        .deliver(awaiting(order_id, customer_id, 700))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, messaging::HandlerError::Permanent(why) if why.contains("500") && why.contains("700")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_declined_payment_charges_nothing_and_its_refund_is_zero() {
    let h = Harness::start("declined").await;
    let order_id = Uuid::now_v7();
    h.deliver(awaiting(order_id, Uuid::now_v7(), LIMIT_CENTS + 1))
        .await
        .unwrap();
    let payment = h.settled(order_id, "DECLINED").await;
    assert_eq!(payment.decline_code.as_deref(), Some("over_limit"));
    assert_eq!(h.net_cents(payment.payment_id).await, 0);
    h.deliver(refund_requested(order_id, LIMIT_CENTS + 1))
        .await
        .unwrap();
    let events = h.events_of(order_id).await;
    match events.as_slice() {
        [Event::PaymentDeclined(d), Event::PaymentRefunded(r)] => {
            assert_eq!(d.decline_code, "over_limit");
            assert_eq!(r.refunded_cents, 0);
        }
        other => panic!(
            "expected PaymentDeclined, PaymentRefunded: {:?}",
            event_types(other)
        ),
    }
    assert_eq!(h.settled(order_id, "DECLINED").await.refunded_cents, 0);
}

#[tokio::test]
async fn a_confirmed_payment_is_refunded_in_full_once() {
    let h = Harness::start("refunded").await;
    let order_id = Uuid::now_v7();
    h.deliver(awaiting(order_id, Uuid::now_v7(), 1_250))
        .await
        .unwrap();
    h.settled(order_id, "CONFIRMED").await;
    h.deliver(refund_requested(order_id, 1_250)).await.unwrap();
    let payment = h.settled(order_id, "REFUNDED").await;
    // A copy of the request after the refund: nothing more.
    h.deliver(refund_requested(order_id, 1_250)).await.unwrap();
    assert_eq!(payment.refunded_cents, 1_250);
    assert_eq!(h.net_cents(payment.payment_id).await, 0);
    let ledger = h.ledger_of(payment.payment_id).await;
    assert_eq!(ledger[0].refunds.len(), 1, "one refund: {ledger:?}");
    let events = h.events_of(order_id).await;
    match events.as_slice() {
        [Event::PaymentConfirmed(_), Event::PaymentRefunded(r)] => {
            assert_eq!(r.refunded_cents, 1_250)
        }
        other => panic!(
            "expected PaymentConfirmed, PaymentRefunded: {:?}",
            event_types(other)
        ),
    }
}

#[tokio::test]
async fn a_refund_asked_for_before_the_payment_voids_it_and_nothing_is_ever_charged() {
    let h = Harness::start("void_first").await;
    let order_id = Uuid::now_v7();
    h.deliver(refund_requested(order_id, 800)).await.unwrap();
    let voided = h.settled(order_id, "VOIDED").await;
    h.deliver(awaiting(order_id, Uuid::now_v7(), 800))
        .await
        .unwrap();
    // The late request was applied in the transaction above: no job was queued for it, so
    // nothing can charge the payment later.
    assert_eq!(
        h.settled(order_id, "VOIDED").await.payment_id,
        voided.payment_id
    );
    assert!(h.ledger_of(voided.payment_id).await.is_empty());
    assert_eq!(h.jobs_of(voided.payment_id).await, (0, 0));
    let events = h.events_of(order_id).await;
    match events.as_slice() {
        [Event::PaymentRefunded(r)] => assert_eq!(r.refunded_cents, 0),
        other => panic!(
            "expected one PaymentRefunded of 0: {:?}",
            event_types(other)
        ),
    }
}

/// The processor hangs: charges time out with their outcome unknown, the breaker opens, and the
/// payments wait (nothing given up, nothing declined). The orders then ask for their money back
/// (their payment step timed out): each payment waits out its in-flight window, asks the
/// ledger, finds nothing charged and is voided. After the processor recovers, nothing is charged.
#[tokio::test]
async fn under_a_hanging_processor_payments_wait_and_a_refund_voids_them_without_a_late_charge() {
    let h = Harness::start("hang").await;
    let orders = h.payments_until_the_breaker_opens(Mode::Hang, 6, 300).await;
    let mut payments = Vec::new();
    for order_id in &orders {
        let payment = h.payment_of(*order_id).await.unwrap();
        assert_eq!(payment.status, "REQUESTED", "an outage is not a decline");
        let (queued, given_up) = h.jobs_of(payment.payment_id).await;
        assert_eq!((queued, given_up), (1, 0), "the charge job waits");
        payments.push(payment.payment_id);
    }
    for order_id in &orders {
        h.deliver(refund_requested(*order_id, 300)).await.unwrap();
    }
    // The ledger is read through the breaker too: its probes find the processor answering.
    for order_id in &orders {
        let payment = h.settled(*order_id, "VOIDED").await;
        assert!(
            payment.attempts >= 1,
            "a charge was sent before the refund: {payment:?}"
        );
        let events = h.events_of(*order_id).await;
        match events.as_slice() {
            [Event::PaymentRefunded(r)] => assert_eq!(r.refunded_cents, 0),
            other => panic!(
                "expected PaymentRefunded of 0 only: {:?}",
                event_types(other)
            ),
        }
    }
    h.faults(Mode::Ok, 0);
    // Every job of these payments ends (a charge job still queued looks again, sees the refund
    // asked for, and sends nothing): once none is left, nothing can charge them any more.
    for payment_id in payments {
        let deadline = Instant::now() + Duration::from_secs(60);
        while h.jobs_of(payment_id).await != (0, 0) {
            assert!(
                Instant::now() < deadline,
                "payment {payment_id} still has jobs: {:?}",
                h.jobs_of(payment_id).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            h.ledger_of(payment_id).await.is_empty(),
            "no late charge of {payment_id}"
        );
    }
}

/// The processor charges but answers too late: the outcome is unknown and the charge is sent
/// again with the same key; once the refund is asked for, the ledger shows the charge, which
/// is recorded (PaymentConfirmed) and refunded in full.
#[tokio::test]
async fn a_charge_whose_answer_never_came_is_found_in_the_ledger_and_refunded() {
    let h = Harness::start("late_answer").await;
    h.faults(Mode::Ok, 2_000);
    let order_id = Uuid::now_v7();
    h.deliver(awaiting(order_id, Uuid::now_v7(), 4_200))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let payment = loop {
        let payment = h.payment_of(order_id).await.unwrap();
        if payment.attempts >= 2 {
            break payment;
        }
        assert!(
            Instant::now() < deadline,
            "the charge was not sent again: {payment:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(payment.status, "REQUESTED");
    // Sent at least twice, charged once.
    let ledger = h.ledger_of(payment.payment_id).await;
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    h.deliver(refund_requested(order_id, 4_200)).await.unwrap();
    h.faults(Mode::Ok, 0);
    let refunded = h.settled(order_id, "REFUNDED").await;
    assert_eq!(refunded.refunded_cents, 4_200);
    assert_eq!(refunded.charge_id, Some(ledger[0].charge.charge_id));
    assert_eq!(h.net_cents(payment.payment_id).await, 0);
    let events = h.events_of(order_id).await;
    match events.as_slice() {
        [Event::PaymentConfirmed(c), Event::PaymentRefunded(r)] => {
            assert_eq!((c.amount_cents, r.refunded_cents), (4_200, 4_200));
        }
        other => panic!(
            "expected PaymentConfirmed, PaymentRefunded: {:?}",
            event_types(other)
        ),
    }
}

/// A charge that reaches the processor after its payment was voided, two ways: recorded there
/// after the client gave up and after the ledger showed nothing (found by the recheck of the
/// ledger that follows the void), and answered after an in-flight window too short for it (found
/// by its own answer: the recheck is an hour away). Either way the late charge is refunded in
/// full, the payment stays VOIDED with its order answered "nothing charged", and the processor
/// keeps nothing.
#[tokio::test]
async fn a_charge_that_reaches_the_processor_after_its_payment_was_voided_is_refunded() {
    let recorded_late = Harness::with(
        "late_recorded",
        Setup {
            charges_held: true,
            late_recheck: Some(Duration::from_secs(5)),
            ..Setup::default()
        },
    )
    .await;
    let answered_late = Harness::with(
        "late_answered",
        Setup {
            charges_held: true,
            request_timeout: Some(Duration::from_secs(20)),
            in_flight_window: Some(Duration::from_millis(50)),
            late_recheck: Some(Duration::from_secs(3600)),
            ..Setup::default()
        },
    )
    .await;
    for h in [recorded_late, answered_late] {
        let order_id = Uuid::now_v7();
        h.deliver(awaiting(order_id, Uuid::now_v7(), 3_300))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while h.payment_of(order_id).await.unwrap().attempts == 0 {
            assert!(Instant::now() < deadline, "the charge was not sent");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        h.deliver(refund_requested(order_id, 3_300)).await.unwrap();
        // Voided while the charge is held: the ledger showed nothing. Then the charge lands.
        let payment = h.settled(order_id, "VOIDED").await;
        h.release_charges();
        let deadline = Instant::now() + Duration::from_secs(60);
        let payment = loop {
            let now = h.payment_of(order_id).await.unwrap();
            if now.late_refunded_cents > 0 && h.jobs_of(payment.payment_id).await == (0, 0) {
                break now;
            }
            assert!(
                Instant::now() < deadline,
                "the late charge was not refunded: {now:?}, jobs {:?}, ledger {:?}",
                h.jobs_of(payment.payment_id).await,
                h.ledger_of(payment.payment_id).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(payment.status, "VOIDED", "{payment:?}");
        assert_eq!(payment.late_refunded_cents, 3_300);
        let ledger = h.ledger_of(payment.payment_id).await;
        assert_eq!(ledger.len(), 1, "charged once: {ledger:?}");
        assert_eq!(payment.late_charge_id, Some(ledger[0].charge.charge_id));
        assert_eq!(ledger[0].refunds.len(), 1, "refunded once: {ledger:?}");
        assert_eq!(h.net_cents(payment.payment_id).await, 0, "nothing kept");
        match h.events_of(order_id).await.as_slice() {
            [Event::PaymentRefunded(r)] => assert_eq!(r.refunded_cents, 0),
            other => panic!(
                "expected PaymentRefunded of 0 only: {:?}",
                event_types(other)
            ),
        }
    }
}

/// A processor in error (503 with Retry-After) delays payments; it never declines or drops
/// them, and they are charged once it is back.
#[tokio::test]
async fn an_outage_delays_payments_and_they_are_charged_once_when_it_ends() {
    let h = Harness::start("outage").await;
    let orders = h
        .payments_until_the_breaker_opens(Mode::Error, 5, 900)
        .await;
    for order_id in &orders {
        assert_eq!(h.payment_of(*order_id).await.unwrap().status, "REQUESTED");
    }
    h.faults(Mode::Ok, 0);
    for order_id in &orders {
        let payment = h.settled(*order_id, "CONFIRMED").await;
        assert_eq!(h.ledger_of(payment.payment_id).await.len(), 1);
        assert_eq!(h.net_cents(payment.payment_id).await, 900);
        assert_eq!(
            h.jobs_of(payment.payment_id).await,
            (0, 0),
            "nothing given up"
        );
    }
}

/// A processor whose answers contradict the requests (another amount) is never believed: the
/// payment stays REQUESTED, no PaymentConfirmed is written, and the charge is sent again.
#[tokio::test]
async fn an_answer_that_contradicts_the_request_is_not_a_success() {
    use axum::Json;
    use axum::routing::post;
    let liar = axum::Router::new().route(
        "/charges",
        post(|Json(body): Json<serde_json::Value>| async move {
            Json(serde_json::json!({
                "charge_id": Uuid::now_v7(),
                "payment_id": body["payment_id"],
                "customer_id": body["customer_id"],
                "amount_cents": body["amount_cents"].as_i64().unwrap_or(0) + 1,
                "status": "succeeded",
                "decline_code": null,
            }))
        }),
    );
    let h = Harness::with(
        "liar",
        Setup {
            gateway: Some(liar),
            ..Setup::default()
        },
    )
    .await;
    let order_id = Uuid::now_v7();
    h.deliver(awaiting(order_id, Uuid::now_v7(), 500))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let payment = h.payment_of(order_id).await.unwrap();
        if payment.attempts >= 2 {
            assert_eq!(payment.status, "REQUESTED");
            break;
        }
        assert!(Instant::now() < deadline, "not sent again: {payment:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(h.events_of(order_id).await.is_empty());
}
