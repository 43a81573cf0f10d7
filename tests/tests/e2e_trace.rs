//! One order is one trace, across the real processes: the HTTP request, the relay's send, the
//! inventory service's processing, the relay's send of the answer and the order service's
//! processing are spans of the caller's trace, each the child of the one before, exported with
//! OTLP (HTTP/JSON) to a receiver in this test, named and attributed by the OpenTelemetry
//! messaging conventions. Both services' JSON logs carry the same trace id and the order id; the
//! relay logs no line per row (its `send` spans, checked above them, carry both).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use e2e::{Stack, StackOptions, eventually};
use serde_json::{Value, json};
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: HashMap<String, Value>,
}

/// Flattens OTLP/JSON export requests into spans.
fn spans(requests: &[Value]) -> Vec<Span> {
    let mut out = Vec::new();
    for request in requests {
        for rs in request["resourceSpans"].as_array().into_iter().flatten() {
            let service = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or("")
                .to_owned();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for span in ss["spans"].as_array().into_iter().flatten() {
                    let attributes = span["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            let value = a["value"]
                                .as_object()
                                .and_then(|v| v.values().next().cloned())
                                .unwrap_or(Value::Null);
                            (a["key"].as_str().unwrap_or("").to_owned(), value)
                        })
                        .collect();
                    let text = |k: &str| span[k].as_str().unwrap_or("").to_lowercase();
                    out.push(Span {
                        service: service.clone(),
                        name: text("name").to_owned(),
                        trace_id: text("traceId"),
                        span_id: text("spanId"),
                        parent: text("parentSpanId"),
                        attributes,
                    });
                }
            }
        }
    }
    out
}

fn attr<'a>(span: &'a Span, key: &str) -> &'a Value {
    span.attributes.get(key).unwrap_or(&Value::Null)
}

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn one_order_is_one_trace_from_the_http_request_to_the_last_event() {
        e2e::requires_own_stack("points the processes' OTLP exporter at its own receiver");
        // An OTLP/HTTP receiver: keeps every export request.
        let received: Arc<Mutex<Vec<Value>>> = Arc::default();
        let app = Router::new().route(
            "/v1/traces",
            post({
                let received = received.clone();
                move |body: String| async move {
                    if let Ok(v) = serde_json::from_str(&body) {
                        received.lock().unwrap().push(v);
                    }
                    "{}"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });

        let env = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let stack = Stack::start_with(
            "trace",
            StackOptions {
                env: vec![
                    env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                    env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
                    env("OTEL_BSP_SCHEDULE_DELAY", "200"),
                    env("LOG_FORMAT", "json"),
                ],
                ..StackOptions::default()
            },
        )
        .await;
        stack.put_product("A", 100, 5).await;

        // The caller's trace: the order's whole saga must continue it.
        let trace_id = Uuid::new_v4().simple().to_string();
        let caller = format!(
            "00-{trace_id}-{}-01",
            &Uuid::new_v4().simple().to_string()[..16]
        );
        let r = stack
            .http
            .post(format!("{}/orders", stack.order_url))
            .header("traceparent", &caller)
            .json(&json!({"customer_id": Uuid::new_v4(), "items": [{"sku": "A", "quantity": 1}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let order_id: Uuid = r.json::<Value>().await.unwrap()["order_id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        stack
            .wait_for_statuses(&[order_id], &["CONFIRMED"], TIMEOUT)
            .await;

        // The saga's hops, each the child of the one before: the request, the relay's send of
        // OrderPlaced, inventory processing it, the send of StockReserved, the order service
        // processing it, the send of OrderConfirmed and inventory processing that.
        let caller_span = caller.split('-').nth(2).unwrap().to_owned();
        let chain = [
            ("order-service", "post /orders"),
            ("outbox-relay", "send orders.v1"),
            ("inventory-service", "process orders.v1"),
            ("outbox-relay", "send inventory.v1"),
            ("order-service", "process inventory.v1"),
            ("outbox-relay", "send orders.v1"),
            ("inventory-service", "process orders.v1"),
        ];
        let walk = |spans: &[Span]| -> Result<Vec<Span>, String> {
            let mut parent = caller_span.clone();
            let mut hops = Vec::new();
            for (service, name) in chain {
                let hop = spans
                    .iter()
                    .find(|s| {
                        s.trace_id == trace_id
                            && s.service == service
                            && s.name == name
                            && s.parent == parent
                    })
                    .ok_or_else(|| format!("no {name} span of {service} with parent {parent}"))?;
                parent = hop.span_id.clone();
                hops.push(hop.clone());
            }
            Ok(hops)
        };
        let hops = eventually(TIMEOUT, || {
            let all = spans(&received.lock().unwrap());
            let result = walk(&all).map(Some).map_err(|e| anyhow::anyhow!(e));
            async move { result }
        })
        .await
        .unwrap_or_else(|e| {
            let all = spans(&received.lock().unwrap());
            panic!(
                "{e}; the spans received: {:#?}",
                all.iter()
                    .map(|s| format!(
                        "{} {} {} {} <- {}",
                        s.service, s.name, s.trace_id, s.span_id, s.parent
                    ))
                    .collect::<Vec<_>>()
            )
        });
        let (send_placed, process_placed, send_reserved, process_reserved) =
            (&hops[1], &hops[2], &hops[3], &hops[4]);

        // Messaging conventions.
        for span in [send_placed, send_reserved] {
            assert_eq!(attr(span, "messaging.system"), "kafka", "{span:?}");
            assert_eq!(attr(span, "messaging.operation.type"), "send");
            assert_eq!(
                attr(span, "messaging.kafka.message.key"),
                &order_id.to_string()
            );
            assert!(attr(span, "messaging.message.id").is_string(), "{span:?}");
            assert!(
                attr(span, "messaging.outbox.wait_ms").is_i64()
                    || attr(span, "messaging.outbox.wait_ms").is_string(),
                "the send span says how long the row waited in the outbox: {span:?}"
            );
        }
        assert_eq!(
            attr(send_placed, "messaging.destination.name"),
            schemas::ORDERS_TOPIC
        );
        for (span, group) in [
            (process_placed, "inventory-service"),
            (process_reserved, "order-service"),
        ] {
            assert_eq!(attr(span, "messaging.system"), "kafka", "{span:?}");
            assert_eq!(attr(span, "messaging.consumer.group.name"), group);
            assert_eq!(
                attr(span, "messaging.kafka.message.key"),
                &order_id.to_string()
            );
            assert!(!attr(span, "messaging.kafka.offset").is_null(), "{span:?}");
            assert!(attr(span, "messaging.message.id").is_string(), "{span:?}");
        }

        // The services' JSON logs: the lines about this order carry its trace id. (The relay
        // logs nothing per row at info; its send spans above carry the order id and the trace.)
        for process in ["order-service", "inventory-service"] {
            let log =
                std::fs::read_to_string(stack.log_dir().join(format!("{process}.log"))).unwrap();
            let lines: Vec<Value> = log
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .filter(|l: &Value| {
                    l["order_id"] == order_id.to_string()
                        || l["span"]["order_id"] == order_id.to_string()
                })
                .collect();
            assert!(
                !lines.is_empty(),
                "{process} logged nothing about {order_id}"
            );
            let traced: Vec<&Value> = lines.iter().filter(|l| !l["span"].is_null()).collect();
            assert!(!traced.is_empty(), "{process}: no log line inside a span");
            for line in traced {
                assert_eq!(line["span"]["trace_id"], trace_id, "{process}: {line}");
            }
        }
    }
}
