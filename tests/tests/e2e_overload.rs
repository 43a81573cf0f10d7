//! A flood of HTTP requests that holds every database connection of the API must not stop the
//! saga: the consumers have their own pool. The flood itself is answered 503 with Retry-After.

use std::time::Duration;

use e2e::{Process, Stack, StackOptions, eventually};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::Connection;
use uuid::Uuid;

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn requests_holding_every_api_connection_do_not_stop_the_saga() {
        e2e::requires_own_stack("starts order-service with a two-connection API pool");
        let mut stack = Stack::start_with(
            "overload_pools",
            StackOptions {
                relay: false,
                env: vec![("DB_MAX_CONNECTIONS".into(), "2".into())],
                ..StackOptions::default()
            },
        )
        .await;
        stack.put_product("A", 100, 10).await;
        // Accepted while the relay is stopped: its saga runs later, during the flood.
        let order = stack.place_order(&[("A", 1)]).await;

        // Two POSTs under one Idempotency-Key wait on the key's lock, which the test holds: each
        // keeps one of the API's two connections.
        let mut lock = sqlx::PgConnection::connect(&format!("{}/{}", stack.pg, stack.orders_db))
            .await
            .unwrap();
        sqlx::query("SELECT pg_advisory_lock(hashtextextended('flood', 0))")
            .execute(&mut lock)
            .await
            .unwrap();
        let body = json!({"customer_id": Uuid::new_v4(), "items": [{"sku": stack.sku("A"), "quantity": 1}]});
        let db = stack.orders_pool().await;
        let flood: Vec<_> = (0..2)
            .map(|_| {
                let request = stack
                    .http
                    .post(format!("{}/orders", stack.order_url))
                    .header("Idempotency-Key", "flood")
                    .json(&body);
                tokio::spawn(async move { request.send().await })
            })
            .collect();
        eventually(Duration::from_secs(30), || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event = 'advisory'",
            )
            .bind(&stack.orders_db)
            .fetch_one(&db)
            .await?;
            Ok((waiting == 2).then_some(()))
        })
        .await
        .expect("both flood requests hold an API connection");

        // The API is out of connections: a new request is told to come back.
        let r = stack
            .http
            .post(format!("{}/orders", stack.order_url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["retry-after"], "1");
        assert_eq!(r.headers()["content-type"], "application/problem+json");

        // The saga goes on meanwhile: read from the database, as the API cannot answer.
        stack.start_process(Process::Relay).await;
        eventually(Duration::from_secs(60), || async {
            let status: String =
                sqlx::query_scalar("SELECT status FROM orders WHERE order_id = $1")
                    .bind(order)
                    .fetch_one(&db)
                    .await?;
            Ok((status == "CONFIRMED").then_some(()))
        })
        .await
        .expect("the order is confirmed while the API's pool is exhausted");

        // Released, the flood finishes: one order, answered twice.
        sqlx::query("SELECT pg_advisory_unlock(hashtextextended('flood', 0))")
            .execute(&mut lock)
            .await
            .unwrap();
        let mut ids = Vec::new();
        for request in flood {
            let r = request.await.unwrap().unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
            let view: serde_json::Value = r.json().await.unwrap();
            ids.push(view["order_id"].clone());
        }
        assert_eq!(ids[0], ids[1], "one order under one key");
    }
}
