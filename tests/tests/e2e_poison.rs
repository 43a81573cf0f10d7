//! Poison messages produced with `kcat`, as a user would: each lands in the consumer group's
//! dead-letter topic with its original bytes and the reason, and the partition keeps flowing.

use std::time::Duration;

use e2e::{Stack, eventually, kafka, kcat};
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn poison_records_from_kcat_are_dead_lettered_and_the_next_valid_one_is_applied() {
    let stack = Stack::start("poison").await;
    stack.put_product("A", 100, 10).await;
    let dir = stack.log_dir().join("kcat-input");
    std::fs::create_dir_all(&dir).unwrap();
    // One key for all, so all land on one partition, in this order.
    let order_id = Uuid::new_v4();
    let key = order_id.to_string();

    let random: Vec<u8> = (0..64u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    let sku = stack.sku("A");
    let bad_schema = format!(
        r#"{{"order_id":"{order_id}","customer_id":"{}","items":[{{"sku":"{sku}","quantity":"two"}}],"placed_at":1}}"#,
        Uuid::new_v4()
    );
    let unknown_type = format!(r#"{{"order_id":"{order_id}"}}"#);
    let valid = format!(
        r#"{{"order_id":"{order_id}","customer_id":"{}","items":[{{"sku":"{sku}","quantity":2}}],"placed_at":1732252800000}}"#,
        Uuid::new_v4()
    );
    let cases: [(&str, &str, &str, Vec<u8>); 4] = [
        ("random", "OrderPlaced", "application/avro", random.clone()),
        (
            "bad-schema",
            "OrderPlaced",
            "application/json",
            bad_schema.clone().into_bytes(),
        ),
        (
            "unknown-type",
            "OrderShipped",
            "application/json",
            unknown_type.clone().into_bytes(),
        ),
        (
            "valid",
            "OrderPlaced",
            "application/json",
            valid.into_bytes(),
        ),
    ];
    let mut message_ids = Vec::new();
    for (name, event_type, content_type, bytes) in &cases {
        let file = dir.join(name);
        std::fs::write(&file, bytes).unwrap();
        let message_id = Uuid::new_v4().to_string();
        let headers = [
            format!("message-id={message_id}"),
            format!("event-type={event_type}"),
            format!("content-type={content_type}"),
            format!("correlation-id={order_id}"),
        ];
        let mut args = vec!["-P", "-t", schemas::ORDERS_TOPIC, "-k", &key];
        for h in &headers {
            args.extend(["-H", h.as_str()]);
        }
        args.push(file.to_str().unwrap());
        kcat(&stack.broker.bootstrap, &args).unwrap();
        message_ids.push(message_id);
    }

    // The valid record after the poison was applied: its order has a reservation.
    eventually(TIMEOUT, || async {
        let r = stack
            .get_json(&format!(
                "{}/reservations?order_id={order_id}",
                stack.inventory_url
            ))
            .await;
        Ok((r.as_array().map(Vec::len) == Some(1)).then_some(()))
    })
    .await
    .expect("the valid record is applied");
    assert_eq!(stack.product("A").await["reserved"], 2);

    // This test's dead letters: those with its key (all of them, on the test's own stack).
    let dlq = eventually(TIMEOUT, || async {
        let records: Vec<_> = kafka::read_topic(&stack.broker.bootstrap, "inventory-service.dlq")
            .await?
            .into_iter()
            .filter(|r| r.key_str() == Some(key.as_str()))
            .collect();
        Ok((records.len() >= 3).then_some(records))
    })
    .await
    .expect("three dead letters");
    assert_eq!(dlq.len(), 3, "only the poison is dead-lettered");
    let expected = [
        ("random", &random, "Avro"),
        ("bad-schema", &bad_schema.into_bytes(), "invalid type"),
        ("unknown-type", &unknown_type.into_bytes(), "OrderShipped"),
    ];
    for (i, (name, bytes, reason)) in expected.iter().enumerate() {
        let record = dlq
            .iter()
            .find(|r| r.header("message-id") == Some(message_ids[i].as_str()))
            .unwrap_or_else(|| panic!("{name} is not in the DLQ"));
        assert_eq!(
            record.payload.as_deref(),
            Some(bytes.as_slice()),
            "{name}: original bytes kept"
        );
        assert_eq!(record.key_str(), Some(key.as_str()), "{name}: key kept");
        assert_eq!(
            record.header("dlq-error-class"),
            Some("permanent"),
            "{name}"
        );
        let message = record.header("dlq-error-message").unwrap_or_default();
        assert!(
            message.contains(reason),
            "{name}: {message:?} should mention {reason:?}"
        );
        assert_eq!(
            record.header("dlq-original-topic"),
            Some(schemas::ORDERS_TOPIC)
        );
        assert_eq!(
            record.header("dlq-consumer-group"),
            Some("inventory-service")
        );
        assert!(
            record
                .header("dlq-original-offset")
                .is_some_and(|o| o.parse::<i64>().is_ok())
        );
        assert_eq!(
            record.header("correlation-id"),
            Some(key.as_str()),
            "original headers kept"
        );
    }
}
