//! A toy saga participant made of the kit alone, as a new one would be: a fraud screen that
//! consumes `orders.v1`, checks each placed order with an outside HTTP API through a job (the
//! call runs outside the consumer's transaction, is retried with the same idempotency key, and
//! its outcome and event are written in one transaction), and emits an event through its outbox.
//! The module `toy` is all the participant's own code; the test runs it against a real broker,
//! Postgres and HTTP, with an outside API that fails each first call.

mod toy {
    use std::time::Duration;

    use messaging::consumer::{AfterCommit, Envelope, Handler, HandlerError};
    use messaging::outbox::{self, Cause};
    use messaging::service::{CommonSettings, ServiceConfig, ServiceMetrics, ServiceSpec};
    use schemas::{Event, OrderConfirmed, OrderRejected};
    use serde::{Deserialize, Serialize};
    use service_kit::http_server::ListenAddr;
    use service_kit::jobs::{self, Completed, Job, JobError, JobHandler, JobKind, Runner};
    use service_kit::outbound::{self, Client};
    use service_kit::shutdown::Shutdown;
    use sqlx::{PgConnection, PgPool};
    use uuid::Uuid;

    pub const GROUP: &str = "fraud-screen";
    const CHECK: &str = "fraud-check";
    static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate::Migrator::DEFAULT;

    /// What the check job needs: who ordered, and the message that asked for it (the cause of
    /// the event it emits).
    #[derive(Serialize, Deserialize)]
    struct Check {
        customer_id: Uuid,
        message_id: Uuid,
        traceparent: Option<String>,
    }

    /// The outside API's answer.
    #[derive(Deserialize)]
    struct Verdict {
        approved: bool,
    }

    /// An OrderPlaced enqueues the order's check, in the inbox transaction.
    struct Orders;

    impl Handler for Orders {
        async fn handle(
            &self,
            conn: &mut PgConnection,
            envelope: &Envelope,
        ) -> Result<AfterCommit, HandlerError> {
            let Event::OrderPlaced(placed) = &envelope.event else {
                return Ok(AfterCommit::none());
            };
            let check = Check {
                customer_id: placed.customer_id,
                message_id: envelope.message_id,
                traceparent: envelope.traceparent.clone(),
            };
            let payload = serde_json::to_value(&check).expect("plain struct");
            jobs::enqueue(
                conn,
                CHECK,
                &placed.order_id.to_string(),
                &payload,
                Duration::ZERO,
            )
            .await?;
            Ok(AfterCommit::none())
        }
    }

    /// Calls the outside API (idempotency key: the order id) and emits the verdict.
    struct FraudCheck {
        api: Client,
    }

    impl JobHandler for FraudCheck {
        async fn run(&self, pool: &PgPool, job: &Job) -> Result<Completed, JobError> {
            let bad = |e: &dyn std::fmt::Display| JobError::Permanent(format!("bad job: {e}"));
            let order_id: Uuid = job.key.parse().map_err(|e| bad(&e))?;
            let check: Check = serde_json::from_value(job.payload.clone()).map_err(|e| bad(&e))?;
            let body =
                serde_json::json!({ "order_id": order_id, "customer_id": check.customer_id });
            let verdict: Verdict = self.api.post("/checks", "/checks", &body, &job.key).await?;
            let at = chrono::Utc::now().timestamp_millis();
            let event = if verdict.approved {
                Event::OrderConfirmed(OrderConfirmed {
                    order_id,
                    total_cents: 0,
                    confirmed_at: at,
                })
            } else {
                let reason = "the fraud screen refused it".into();
                Event::OrderRejected(OrderRejected {
                    order_id,
                    reason,
                    rejected_at: at,
                })
            };
            let cause = Cause {
                causation_id: Some(check.message_id),
                traceparent: check.traceparent,
                tracestate: None,
            };
            let mut tx = pool.begin().await?;
            let done = job.complete(&mut tx).await?;
            outbox::append(&mut tx, &event, &cause).await?;
            tx.commit().await?;
            Ok(done)
        }
    }

    /// Runs the fraud screen until `shutdown`.
    pub async fn run(
        common: CommonSettings,
        database_url: String,
        api_url: String,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let timeouts = outbound::Timeouts {
            connect: Duration::from_secs(1),
            request: Duration::from_secs(5),
        };
        let check = JobKind {
            kind: CHECK,
            max_attempts: 10,
            lease: Duration::from_secs(30),
            backoff: service_kit::backoff::Backoff::TRANSIENT,
        };
        let api = Client::new("fraud-api", &api_url, timeouts)?;
        let spec = ServiceSpec {
            name: "fraud-screen",
            migrations: &MIGRATIONS,
            group: GROUP,
            subscribe: &[schemas::ORDERS_TOPIC],
            handler: Orders,
            routes: |_pool| axum::Router::new(),
            background: Vec::new(),
            jobs: Runner::default()
                .polling_every(Duration::from_millis(200))
                .with(check, FraudCheck { api }),
            pruned: Vec::new(),
            metrics: ServiceMetrics::NONE,
        };
        let config = ServiceConfig {
            listen_addr: "127.0.0.1:0"
                .parse::<ListenAddr>()
                .map_err(anyhow::Error::msg)?,
            database_url,
            common,
        };
        messaging::service::run(spec, config, shutdown).await
    }
}

mod own_stack {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::http::StatusCode;
    use clap::Parser as _;
    use e2e::{Broker, eventually, kafka};
    use schemas::{OrderItem, OrderPlaced};
    use serde_json::{Value, json};
    use sqlx::PgPool;
    use uuid::Uuid;

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        common: messaging::service::CommonSettings,
    }

    /// The outside API: fails each order's first call with a 503, approves on the next ones
    /// with the same answer each time, and refuses customers whose id ends in `0`. Counts the
    /// calls per idempotency key.
    async fn fraud_api(calls: Arc<Mutex<HashMap<String, usize>>>) -> String {
        let app = axum::Router::new().route(
            "/checks",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::Json<Value>| {
                    let calls = calls.clone();
                    async move {
                        let key = headers
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let n = {
                            let mut calls = calls.lock().unwrap();
                            let n = calls.entry(key).or_default();
                            *n += 1;
                            *n
                        };
                        if n == 1 {
                            return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({})))
                                .into_response();
                        }
                        let customer = body["customer_id"].as_str().unwrap_or_default();
                        axum::Json(json!({ "approved": !customer.ends_with('0') })).into_response()
                    }
                },
            ),
        );
        use axum::response::IntoResponse as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_toy_participant_checks_each_order_through_a_job_and_emits_one_verdict_each() {
        e2e::requires_own_stack("runs a participant of its own on its own broker");
        let log_dir = e2e::test_log_dir("toy_participant");
        let broker = Broker::start(&log_dir).await;
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let api = fraud_api(calls.clone()).await;
        let database_url = format!("{}/toy_{}", e2e::postgres_url(), std::process::id());
        let flags = Flags::parse_from([
            "fraud-screen",
            "--kafka-bootstrap-servers",
            &broker.bootstrap,
        ]);
        let (stop, shutdown) = service_kit::shutdown::Shutdown::new();
        let service = tokio::spawn(super::toy::run(
            flags.common,
            database_url.clone(),
            api,
            shutdown,
        ));

        // Ten placed orders; every third customer's id ends in 0 (refused), the rest approved.
        let orders: Vec<(Uuid, Uuid)> = (0..10u128)
            .map(|n| {
                (
                    Uuid::now_v7(),
                    Uuid::from_u128(n << 4 | u128::from(n % 3 != 0)),
                )
            })
            .collect();
        for (order_id, customer_id) in &orders {
            let event = OrderPlaced {
                order_id: *order_id,
                customer_id: *customer_id,
                items: vec![OrderItem {
                    sku: "A".into(),
                    quantity: 1,
                }],
                placed_at: 0,
            };
            let message_id = Uuid::now_v7().to_string();
            kafka::produce(
                &broker.bootstrap,
                schemas::ORDERS_TOPIC,
                None,
                Some(&order_id.to_string()),
                &[("message-id", &message_id)],
                &schemas::encode(&event.into()),
            )
            .await
            .expect("produce");
        }

        let pool = PgPool::connect(&database_url)
            .await
            .expect("the toy's database");
        eventually(Duration::from_secs(60), async || {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(&pool)
                .await?;
            Ok((n >= 10).then_some(()))
        })
        .await
        .expect("every order has its verdict within 60 s");
        stop.fire();
        service.await.unwrap().expect("the toy stopped cleanly");

        let verdicts: Vec<(String, String)> =
            sqlx::query_as("SELECT aggregate_id, event_type FROM outbox ORDER BY aggregate_id")
                .fetch_all(&pool)
                .await
                .unwrap();
        let mut expected: Vec<(String, String)> = orders
            .iter()
            .map(|(order_id, customer_id)| {
                let refused = customer_id.to_string().ends_with('0');
                let event = if refused {
                    "OrderRejected"
                } else {
                    "OrderConfirmed"
                };
                (order_id.to_string(), event.to_owned())
            })
            .collect();
        expected.sort();
        assert_eq!(verdicts, expected, "one verdict per order, the API's");
        let jobs_left: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(jobs_left, 0, "every check job completed");
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 10, "one idempotency key per order: {calls:?}");
        assert!(
            calls.values().all(|n| *n == 2),
            "each order's check failed once and was repeated once: {calls:?}"
        );
        pool.close().await;
    }
}
