//! The HTTP contracts: bad input is a 4xx problem+json that names the problem and writes nothing;
//! Idempotency-Key makes a retried POST safe.

use e2e::Stack;
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn assert_problem(response: reqwest::Response, status: StatusCode, detail_contains: &str) {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "content type of a {status} answer"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(detail_contains),
        "detail {detail:?} should mention {detail_contains:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_a_problem_naming_the_problem_and_write_nothing() {
    let stack = Stack::start("bad_requests").await;
    let orders = format!("{}/orders", stack.order_url);
    let customer = uuid::Uuid::new_v4().to_string();
    let post_raw = |body: &'static str, content_type: &'static str| {
        stack
            .http
            .post(&orders)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let post = |body: Value| stack.http.post(&orders).json(&body).send();

    assert_problem(
        post_raw("{\"customer_id\": ", "application/json")
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "malformed JSON",
    )
    .await;
    assert_problem(
        post_raw("customer_id=1", "application/x-www-form-urlencoded")
            .await
            .unwrap(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "application/json",
    )
    .await;
    let cases = [
        (
            json!({"customer_id": customer, "items": [{"sku": "A", "quantity": 1}], "coupon": "X"}),
            "unknown field `coupon`",
        ),
        (
            json!({"customer_id": customer, "items": [{"sku": "A", "quantity": 1, "price": 5}]}),
            "unknown field `price`",
        ),
        (json!({"customer_id": customer}), "missing field `items`"),
        (
            json!({"customer_id": customer, "items": [{"sku": "A", "quantity": "two"}]}),
            "invalid type",
        ),
    ];
    for (body, detail) in cases {
        assert_problem(
            post(body).await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            detail,
        )
        .await;
    }
    let cases = [
        (
            json!({"customer_id": customer, "items": []}),
            "items must not be empty",
        ),
        (
            json!({"customer_id": customer, "items": [{"sku": "A", "quantity": 0}]}),
            "items[0].quantity",
        ),
        (
            json!({"customer_id": customer, "items": [{"sku": "A", "quantity": 1}, {"sku": "B", "quantity": -3}]}),
            "items[1].quantity",
        ),
        (
            json!({"customer_id": customer, "items": [{"sku": "", "quantity": 1}]}),
            "items[0].sku",
        ),
        (
            json!({"customer_id": "bob", "items": [{"sku": "A", "quantity": 1}]}),
            "customer_id \"bob\" is not a UUID",
        ),
    ];
    for (body, detail) in cases {
        assert_problem(
            post(body).await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            detail,
        )
        .await;
    }
    let unknown = uuid::Uuid::new_v4();
    assert_problem(
        stack
            .http
            .get(format!("{orders}/{unknown}"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        &format!("no order {unknown}"),
    )
    .await;
    assert_problem(
        stack.http.get(format!("{orders}/42")).send().await.unwrap(),
        StatusCode::BAD_REQUEST,
        "not a UUID",
    )
    .await;
    assert_problem(
        stack
            .http
            .get(format!("{orders}?status=SHIPPED"))
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "unknown order status \"SHIPPED\"",
    )
    .await;
    assert_problem(
        stack
            .http
            .get(format!("{orders}?limit=0"))
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "limit must be between 1 and 500",
    )
    .await;
    assert_problem(
        stack
            .http
            .put(format!(
                "{}/products/{}",
                stack.inventory_url,
                stack.sku("A")
            ))
            .json(&json!({"name": "a", "price_cents": 10, "available": -1}))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "available must be between 0 and 1000000000000, got -1",
    )
    .await;
    // Found by the HTTP fuzzing: a NUL in a name was a 500 (Postgres text cannot hold it).
    assert_problem(
        stack
            .http
            .put(format!(
                "{}/products/{}",
                stack.inventory_url,
                stack.sku("A")
            ))
            .json(&json!({"name": "\u{0}!\u{f}", "price_cents": 10, "available": 1}))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "name must not contain control characters",
    )
    .await;
    assert_problem(
        stack
            .http
            .put(format!("{}/products/bad%20sku", stack.inventory_url))
            .json(&json!({"name": "a", "price_cents": 10, "available": 1}))
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "only letters, digits",
    )
    .await;

    // Nothing was written anywhere: on the test's own stack every table is still empty; on a
    // shared one nothing has the test's customer or its sku.
    let orders_db = stack.orders_pool().await;
    if stack.is_external() {
        for table in ["orders", "order_status_view"] {
            let n: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {table} WHERE customer_id::text = $1"
            ))
            .bind(&customer)
            .fetch_one(&orders_db)
            .await
            .unwrap();
            assert_eq!(n, 0, "{table} has an order of the test's customer");
        }
        let r = stack
            .http
            .get(format!(
                "{}/products/{}",
                stack.inventory_url,
                stack.sku("A")
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        return;
    }
    for table in ["orders", "order_status_view", "outbox", "idempotency_keys"] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&orders_db)
            .await
            .unwrap();
        assert_eq!(n, 0, "{table} must be empty");
    }
    let inventory_db = stack.inventory_pool().await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
        .fetch_one(&inventory_db)
        .await
        .unwrap();
    assert_eq!(n, 0);
    let listed = stack.get_json(&orders).await;
    assert_eq!(listed, json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_idempotency_key_and_body_gets_the_same_order_and_another_body_gets_422() {
    let stack = Stack::start("idempotency").await;
    stack.put_product("A", 100, 100).await;
    let orders = format!("{}/orders", stack.order_url);
    let customer = uuid::Uuid::new_v4();
    let body = json!({"customer_id": customer, "items": [{"sku": stack.sku("A"), "quantity": 2}]});
    // Keys of this run only: a shared stack keeps the keys of earlier runs.
    let key_1 = format!("key-1-{customer}");
    let key_2 = format!("key-2-{customer}");
    let send = |key: &str, body: Value| {
        stack
            .http
            .post(&orders)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };

    // Ten concurrent retries of one request: one order, ten identical answers.
    let responses = join_all((0..10).map(|_| send(&key_1, body.clone()))).await;
    let mut answers = Vec::new();
    for r in responses {
        let r = r.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let location = r.headers()["location"].to_str().unwrap().to_owned();
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            location,
            format!("/orders/{}", body["order_id"].as_str().unwrap())
        );
        answers.push(body);
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    let orders_of_customer = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders WHERE customer_id = $1")
            .bind(customer)
            .fetch_one(&stack.orders_pool().await)
            .await
            .unwrap()
    };
    assert_eq!(orders_of_customer().await, 1);

    let other = json!({"customer_id": uuid::Uuid::new_v4(), "items": [{"sku": stack.sku("A"), "quantity": 3}]});
    let r = send(&key_1, other).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.headers()["content-type"], "application/problem+json");

    // A new key is a new order.
    let r = send(&key_2, body.clone()).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(orders_of_customer().await, 2);
    let listed = stack.get_json(&format!("{orders}?limit=10")).await;
    let listed_of_customer = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["customer_id"] == customer.to_string())
        .count();
    assert_eq!(listed_of_customer, 2, "{listed}");
}

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    /// With an admin token configured, `PUT /products/{sku}` (prices and stock are everyone's) needs
    /// it: none is 401 with `WWW-Authenticate: Bearer`, a wrong one 403, both problem+json with
    /// nothing stored; reading stays open.
    #[tokio::test(flavor = "multi_thread")]
    async fn product_changes_need_the_admin_token_when_one_is_set() {
        e2e::requires_own_stack("starts inventory-service with an admin token");
        let token = "a-long-enough-admin-token-for-tests";
        let stack = Stack::start_with(
            "http_admin_token",
            e2e::StackOptions {
                env: vec![("ADMIN_TOKEN".into(), token.into())],
                ..e2e::StackOptions::default()
            },
        )
        .await;
        let url = format!("{}/products/{}", stack.inventory_url, stack.sku("A"));
        let body = json!({"name": "a", "price_cents": 10, "available": 5});
        let r = stack.http.put(&url).json(&body).send().await.unwrap();
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        assert_problem(r, StatusCode::UNAUTHORIZED, "needs an admin token").await;
        let r = stack
            .http
            .put(&url)
            .bearer_auth("not-the-token-at-all-000")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_problem(r, StatusCode::FORBIDDEN, "not valid").await;
        assert_eq!(
            stack.http.get(&url).send().await.unwrap().status(),
            StatusCode::NOT_FOUND,
            "nothing stored"
        );
        let r = stack
            .http
            .put(&url)
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(stack.product("A").await["available"], 5);
    }
}
