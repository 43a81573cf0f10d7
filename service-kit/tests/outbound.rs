//! Calls to an outside API over real HTTP: what reaches the server (idempotency key,
//! traceparent) and how every kind of answer, or none, is classified.

use std::time::Duration;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::{Value, json};
use service_kit::outbound::{CallError, Client, MAX_ANSWER_BYTES, Timeouts};

/// A server that answers each route as its name says; its base URL.
async fn server() -> String {
    let app = axum::Router::new()
        .route(
            "/echo",
            post(|headers: HeaderMap, body: String| async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                axum::Json(json!({
                    "idempotency_key": header("idempotency-key"),
                    "traceparent": header("traceparent"),
                    "body": body,
                }))
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .route(
            "/fail",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
        )
        .route(
            "/busy",
            get(|| async {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, "7")],
                    "slow down",
                )
            }),
        )
        .route(
            "/down-for",
            get(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "100000")],
                    "maintenance",
                )
            }),
        )
        .route(
            "/down",
            get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "down") }),
        )
        .route(
            "/refused",
            get(|| async { (StatusCode::UNPROCESSABLE_ENTITY, "card number is not valid") }),
        )
        .route(
            "/huge",
            get(|| async { "x".repeat(MAX_ANSWER_BYTES + 1).into_response() }),
        )
        .route("/nonsense", get(|| async { "not json" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

fn client(base: &str) -> Client {
    Client::new(
        "test-api",
        base,
        Timeouts {
            connect: Duration::from_secs(2),
            request: Duration::from_millis(500),
        },
    )
    .unwrap()
}

#[tokio::test]
async fn a_call_carries_its_idempotency_key_and_traceparent_and_returns_the_answer() {
    let base = server().await;
    let answer: Value = client(&base)
        .post("/echo", "/echo", &json!({"amount_cents": 500}), "payment-1")
        .await
        .unwrap();
    assert_eq!(answer["idempotency_key"], "payment-1");
    let traceparent = answer["traceparent"].as_str().unwrap_or_default();
    assert!(
        service_kit::trace_context::trace_id(traceparent).is_some(),
        "a well-formed traceparent reached the server: {answer}"
    );
    assert_eq!(answer["body"], r#"{"amount_cents":500}"#);
}

#[tokio::test]
async fn every_kind_of_failure_is_classified() {
    let base = server().await;
    let client = client(&base);
    let call = async |path: &'static str| client.get::<Value>(path, path).await.unwrap_err();

    let slow = call("/slow").await;
    assert!(
        matches!(slow, CallError::Transient { .. }) && slow.outcome_unknown(),
        "a timeout: the request was sent, its outcome is unknown: {slow:?}"
    );
    let fail = call("/fail").await;
    assert!(
        matches!(&fail, CallError::Transient { reason, .. } if reason.contains("500"))
            && fail.outcome_unknown()
    );
    assert_eq!(
        call("/busy").await,
        CallError::Retryable {
            reason: "answered 429 Too Many Requests: slow down".into(),
            after: Duration::from_secs(7)
        }
    );
    assert!(
        matches!(call("/down-for").await, CallError::Retryable { after, .. } if after == service_kit::outbound::MAX_RETRY_AFTER),
        "a Retry-After is honoured up to a bound"
    );
    assert!(matches!(call("/down").await, CallError::Transient { .. }));
    assert_eq!(
        call("/refused").await,
        CallError::Permanent {
            status: 422,
            reason: "answered 422 Unprocessable Entity: card number is not valid".into()
        }
    );
    let huge = call("/huge").await;
    assert!(
        matches!(&huge, CallError::Transient { reason, .. } if reason.contains("more than")),
        "{huge:?}"
    );
    let nonsense = call("/nonsense").await;
    assert!(
        matches!(&nonsense, CallError::Transient { reason, .. } if reason.contains("not what its API promises"))
            && nonsense.outcome_unknown(),
        "{nonsense:?}"
    );
}

#[tokio::test]
async fn a_refused_connection_was_never_sent() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let error = client(&format!("http://127.0.0.1:{port}"))
        .post::<_, Value>("/echo", "/echo", &json!({}), "k")
        .await
        .unwrap_err();
    assert!(
        matches!(error, CallError::Transient { .. }) && !error.outcome_unknown(),
        "nothing reached a server: {error:?}"
    );
}

#[test]
fn a_url_that_is_not_http_is_refused() {
    assert!(
        Client::new(
            "x",
            "ftp://example.com",
            Timeouts {
                connect: Duration::from_secs(1),
                request: Duration::from_secs(1)
            }
        )
        .is_err()
    );
}
