//! The operators' tool against a real stack: `saga dlq list/show/redrive` and `saga tail`.

use std::process::Command;
use std::time::Duration;

use e2e::{Stack, StackOptions, binary, eventually, kafka};
use serde_json::{Value, json};
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(60);

fn saga(stack: &Stack, args: &[&str]) -> String {
    let output = Command::new(binary("saga"))
        .args(["-b", &stack.broker.bootstrap])
        .args(args)
        .output()
        .expect("running saga");
    assert!(
        output.status.success(),
        "saga {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_dead_letter_redriven_after_its_cause_is_fixed_is_applied_once_even_if_redriven_twice()
     {
        e2e::requires_own_stack("starts the services with short retry delays");
        let stack = Stack::start_with(
            "redrive",
            StackOptions {
                retry_delays: Some("500ms".into()),
                ..StackOptions::default()
            },
        )
        .await;
        // A rejection for an order order-service does not have: retried once, then dead-lettered.
        let order_id = Uuid::new_v4();
        let message_id = Uuid::new_v4().to_string();
        let body = json!({"order_id": order_id, "reason": "no tea left", "shortages": [], "rejected_at": 1732252800000i64});
        let key = order_id.to_string();
        kafka::produce(
            &stack.broker.bootstrap,
            schemas::INVENTORY_TOPIC,
            None,
            Some(&key),
            &[
                ("message-id", &message_id),
                ("event-type", "StockReservationRejected"),
                ("content-type", "application/json"),
                ("correlation-id", &key),
            ],
            body.to_string().as_bytes(),
        )
        .await
        .unwrap();
        let listed = eventually(TIMEOUT, || async {
            let lines = json_lines(&saga(&stack, &["dlq", "list", "-g", "order-service"]));
            Ok((!lines.is_empty()).then_some(lines))
        })
        .await
        .expect("the record is dead-lettered");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0]["message_id"], message_id);
        assert_eq!(listed[0]["event_type"], "StockReservationRejected");
        assert_eq!(listed[0]["error_class"], "retryable");
        assert_eq!(listed[0]["original_topic"], schemas::INVENTORY_TOPIC);
        assert_eq!(listed[0]["attempts"], "2");
        let shown: Value = serde_json::from_str(&saga(
            &stack,
            &["dlq", "show", "-g", "order-service", &message_id],
        ))
        .unwrap();
        assert_eq!(shown["event"]["reason"], "no tea left", "{shown}");

        // A dry run sends nothing.
        let dry = json_lines(&saga(
            &stack,
            &[
                "dlq",
                "redrive",
                "-g",
                "order-service",
                "--message-id",
                &message_id,
                "--dry-run",
            ],
        ));
        assert_eq!(dry.len(), 1);
        assert_eq!(dry[0]["action"], "would redrive");
        let on_topic = || async {
            kafka::read_topic(&stack.broker.bootstrap, schemas::INVENTORY_TOPIC)
                .await
                .unwrap()
                .len()
        };
        assert_eq!(on_topic().await, 1);

        // Fix the cause (the order now exists), then redrive: applied once.
        stack.create_order_quietly(order_id).await;
        let redriven = json_lines(&saga(
            &stack,
            &[
                "dlq",
                "redrive",
                "-g",
                "order-service",
                "--message-id",
                &message_id,
            ],
        ));
        assert_eq!(redriven[0]["action"], "redriven");
        stack
            .wait_for_statuses(&[order_id], &["REJECTED"], TIMEOUT)
            .await;

        // Redriven again: the inbox knows the message id; no second effect, the duplicate is counted.
        saga(&stack, &["dlq", "redrive", "-g", "order-service", "--all"]);
        eventually(TIMEOUT, || async {
            let n = stack
                .metric(
                    &stack.order_url,
                    "consumer_messages_duplicate_total",
                    &[("event_type", "StockReservationRejected")],
                )
                .await;
            Ok((n >= 1.0).then_some(()))
        })
        .await
        .expect("the second redrive is skipped as a duplicate");
        let order = stack.order(order_id).await;
        assert_eq!(order["reason"], "no tea left");
        assert_eq!(
            order["history"].as_array().map(Vec::len),
            Some(2),
            "{order}"
        );

        // The redriven copies kept the message id and dropped the dead-letter headers.
        let records = kafka::read_topic(&stack.broker.bootstrap, schemas::INVENTORY_TOPIC)
            .await
            .unwrap();
        assert_eq!(records.len(), 3);
        for r in &records {
            assert_eq!(r.header("message-id"), Some(message_id.as_str()));
            assert!(r.headers.iter().all(|(k, _)| !k.starts_with("dlq-")));
        }

        // `saga tail` decodes what is on a topic.
        let tailed = json_lines(&saga(&stack, &["tail", schemas::ORDERS_TOPIC]));
        let rejected: Vec<&Value> = tailed
            .iter()
            .filter(|r| r["event_type"] == "OrderRejected")
            .collect();
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0]["event"]["order_id"], order_id.to_string());
        assert_eq!(rejected[0]["event"]["reason"], "no tea left");
    }
}
