//! Retention, with every retention shortened to seconds: the inbox forgets a message only once
//! no copy of it can arrive any more (twice the longest retention of the topics it can come
//! from), so a duplicate inside that window is still skipped; the rows are then deleted; an
//! idempotency key expires after its lifetime and is free again.

use std::time::Duration;

use e2e::kafka::{self, Outgoing};
use e2e::{Stack, StackOptions, eventually};
use serde_json::json;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(90);

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_duplicate_inside_the_window_is_skipped_and_rows_past_it_are_deleted() {
        e2e::requires_own_stack("starts the services with retentions of seconds");
        let env = [
            ("TOPIC_RETENTION", "10s"),
            ("RETRY_TOPIC_RETENTION", "10s"),
            ("DLQ_RETENTION", "10s"),
            ("PARKED_KEY_TIMEOUT", "5s"),
            ("INBOX_RETENTION", "1s"),
            ("IDEMPOTENCY_KEY_TTL", "10s"),
        ];
        let stack = Stack::start_with(
            "retention",
            StackOptions {
                retry_delays: Some("200ms".into()),
                env: env
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..StackOptions::default()
            },
        )
        .await;
        // The window: twice the longest retention of orders.v1, the retry topic and the DLQ (the
        // retention job exports it as it starts, next to readiness).
        let window = eventually(TIMEOUT, || async {
            let text = stack.metrics_text(&stack.inventory_url).await;
            Ok(text
                .contains("db_table_retention_seconds{table=\"inbox\"}")
                .then(|| {
                    e2e::sum_metric(&text, "db_table_retention_seconds", &[("table", "inbox")])
                }))
        })
        .await
        .expect("the inbox's retention is exported");
        assert_eq!(window, 20.0, "the inbox keeps a message for 2 × 10 s");

        // An OrderPlaced produced by hand, applied once: one unit reserved.
        stack.put_product("A", 100, 10).await;
        let (order_id, message_id) = (Uuid::new_v4(), Uuid::new_v4());
        let placed = json!({"order_id": order_id, "customer_id": Uuid::new_v4(),
            "items": [{"sku": stack.sku("A"), "quantity": 1}], "placed_at": 1732252800000i64});
        let record = Outgoing {
            topic: schemas::ORDERS_TOPIC.to_owned(),
            key: Some(order_id.to_string().into_bytes()),
            headers: [
                ("message-id", message_id.to_string()),
                ("event-type", "OrderPlaced".to_owned()),
                ("content-type", "application/json".to_owned()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into_bytes()))
            .collect(),
            payload: Some(placed.to_string().into_bytes()),
        };
        kafka::produce_many(&stack.broker.bootstrap, std::slice::from_ref(&record))
            .await
            .unwrap();
        eventually(TIMEOUT, || async {
            Ok((stack.product("A").await["reserved"] == 1).then_some(()))
        })
        .await
        .expect("the OrderPlaced is applied");

        // The same record again once its inbox row is 14 s old: past the topics' retention
        // (10 s) and --inbox-retention (1 s), inside the window (20 s): skipped, nothing
        // reserved twice. A window of one retention would have pruned the row by then (the job
        // runs every 2 s), and the copy would be claimed afresh.
        let inventory = stack.inventory_pool().await;
        let inbox_age = |inventory: &sqlx::PgPool| {
            let inventory = inventory.clone();
            async move {
                let age: Option<f64> = sqlx::query_scalar(
                    "SELECT EXTRACT(EPOCH FROM now() - processed_at)::float8 FROM inbox \
                     WHERE message_id = $1",
                )
                .bind(message_id)
                .fetch_optional(&inventory)
                .await?;
                anyhow::Ok(age)
            }
        };
        let kept = eventually(TIMEOUT, || async {
            Ok(match inbox_age(&inventory).await? {
                Some(age) if age <= 14.0 => None,
                other => Some(other.is_some()),
            })
        })
        .await
        .unwrap();
        assert!(kept, "the inbox row was pruned before it was 14 s old");
        kafka::produce_many(&stack.broker.bootstrap, std::slice::from_ref(&record))
            .await
            .unwrap();
        let duplicates = [
            ("group", "inventory-service"),
            ("event_type", "OrderPlaced"),
        ];
        eventually(TIMEOUT, || async {
            let skipped = stack
                .metric(
                    &stack.inventory_url,
                    "consumer_messages_duplicate_total",
                    &duplicates,
                )
                .await;
            Ok((skipped == 1.0).then_some(()))
        })
        .await
        .expect("the duplicate is skipped");
        let product = stack.product("A").await;
        assert_eq!(
            (&product["available"], &product["reserved"]),
            (&json!(9), &json!(1)),
            "{product}"
        );

        // Past the window the row goes, deleted by the retention job.
        eventually(TIMEOUT, || async {
            Ok(inbox_age(&inventory).await?.is_none().then_some(()))
        })
        .await
        .expect("the inbox row is deleted after the window");
        assert!(
            stack
                .metric(
                    &stack.inventory_url,
                    "db_rows_pruned_total",
                    &[("table", "inbox")]
                )
                .await
                >= 1.0
        );
        // A copy that arrived now would no longer be known as a duplicate (the domain still
        // ignores it: the order has its reservation): the window is what keeps duplicates out,
        // and no broker keeps a copy that long (here the topics' 10 s retention).
        kafka::produce_many(&stack.broker.bootstrap, std::slice::from_ref(&record))
            .await
            .unwrap();
        eventually(TIMEOUT, || async {
            Ok(inbox_age(&inventory).await?.is_some().then_some(()))
        })
        .await
        .expect("past the window the copy is claimed afresh");
        assert_eq!(
            stack
                .metric(
                    &stack.inventory_url,
                    "consumer_messages_duplicate_total",
                    &duplicates
                )
                .await,
            1.0,
            "past the window the copy is not counted as a duplicate"
        );
        assert_eq!(stack.product("A").await["reserved"], 1);

        // An idempotency key is remembered for its lifetime, then forgotten.
        let body = json!({"customer_id": Uuid::new_v4(), "items": [{"sku": stack.sku("A"), "quantity": 1}]});
        let post = |key: &'static str| {
            let request = stack
                .http
                .post(format!("{}/orders", stack.order_url))
                .header("Idempotency-Key", key)
                .json(&body);
            async move {
                let r = request.send().await.unwrap();
                assert_eq!(r.status(), 201);
                r.json::<serde_json::Value>().await.unwrap()["order_id"].clone()
            }
        };
        let first = post("retention-key").await;
        assert_eq!(
            post("retention-key").await,
            first,
            "remembered within its lifetime"
        );
        let orders = stack.orders_pool().await;
        eventually(TIMEOUT, || async {
            let left: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM idempotency_keys WHERE idempotency_key = 'retention-key'",
            )
            .fetch_one(&orders)
            .await?;
            Ok((left == 0).then_some(()))
        })
        .await
        .expect("the expired key is deleted");
        assert_ne!(
            post("retention-key").await,
            first,
            "free again after its lifetime"
        );
    }
}
